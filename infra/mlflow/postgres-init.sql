-- Runs once, on an empty data directory: a second database for MLflow's users and permissions.
CREATE DATABASE mlflow_auth;
