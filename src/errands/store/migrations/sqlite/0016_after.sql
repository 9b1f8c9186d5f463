-- PostgreSQL only (what precedes a transaction's events); nothing changes here.
SELECT 1;
