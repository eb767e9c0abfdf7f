"""MLflow behind its own authentication (`mlflow server --app-name basic-auth`): who may write what.

MLflow's admin is the aggregator's identity: it logs each run and registers each version. The dashboards log in
as their own user, which reads everything (the server's default permission, READ) and may edit one thing: the
registered model, whose champion alias an admin moves from the dashboard. No one else gets in at all (401), and
a champion set in MLflow by any other route is refused by every dashboard anyway (its attestation is missing:
`registry.py`). `set_up_dashboard_user` is what `health-mlops mlflow-auth` runs, as MLflow's admin
(`MLFLOW_TRACKING_USERNAME`, `MLFLOW_TRACKING_PASSWORD`), once MLflow is up: in Kubernetes as the aggregator's
init container, in compose as a one-shot.
"""

from __future__ import annotations

from mlflow.exceptions import MlflowException, RestException

DASHBOARD_USER = "dashboard"


def set_up_dashboard_user(tracking_uri: str, model_name: str, password: str, *,
                          username: str = DASHBOARD_USER) -> str:
    """The dashboards' MLflow user, with `password` and EDIT on `model_name`'s registered model; what was done."""
    from mlflow.server.auth.client import AuthServiceClient

    client = AuthServiceClient(tracking_uri)
    try:
        client.create_user(username, password)
        done = f"created the MLflow user {username}"
    except RestException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        client.update_user_password(username, password)
        done = f"set the MLflow user {username}'s password"
    try:
        client.grant_user_permission(username, "registered_model", model_name, "EDIT")
    except MlflowException as error:
        if getattr(error, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    return f"{done}; it reads everything and may edit the registered model {model_name} (its champion alias)"
