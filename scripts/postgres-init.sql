-- Run once by the official postgres image on an empty data volume (docker-compose.yml mounts it into
-- /docker-entrypoint-initdb.d/). POSTGRES_DB creates `optuna` (the Optuna study storage); MLflow's backend store
-- gets its own database. scripts/services.py creates the same two databases for the tests.
CREATE DATABASE mlflow;
