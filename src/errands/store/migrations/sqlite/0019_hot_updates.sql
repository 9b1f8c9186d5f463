-- PostgreSQL only (heap-only updates of tasks); nothing changes here.
SELECT 1;
