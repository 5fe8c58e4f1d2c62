-- Runs once, when the PostgreSQL data volume is empty (mounted into
-- /docker-entrypoint-initdb.d by infra/compose.yaml). One server, one database
-- per service, both owned by POSTGRES_USER. tests/test_infra.py reads the
-- names below and checks that the MLflow and Prefect URLs in compose.yaml use them.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
