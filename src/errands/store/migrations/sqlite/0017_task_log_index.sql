-- PostgreSQL only (how a worker process reads its tasks' events); nothing changes here.
SELECT 1;
