-- PostgreSQL only (the bound below which its event log may be read); nothing changes here.
SELECT 1;
