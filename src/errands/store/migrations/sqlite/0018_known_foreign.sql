-- PostgreSQL only (what a session knows of other applications' transactions); nothing changes here.
SELECT 1;
