"""The dashboard: Gradio tabs over the same predictor, registry and federation as the REST API.

Predict and Batch score in-process with the champion (counted as endpoint "ui" in the serving metrics);
Training and Hospitals follow the federation live; Models shows the champion's federated model report and promotes
and rolls back with the admin token;
Monitoring reads the serving metrics and the champion's drift scores.

One module per tab (`predict`, `batch`, `training`, `hospitals`, `models`, `monitoring`), each with its callbacks
and what they draw; `shared` holds what the tabs share, and `page` the page itself: `Dashboard`, all the tabs'
callbacks on one object, `build_dashboard` and the role each callback needs.
"""

from health_mlops.serving.ui.batch import INVALID_ROW_COLUMNS, OUTPUT_COLUMNS, RESULTS_KEPT_S
from health_mlops.serving.ui.hospitals import HOSPITAL_COLUMN_TYPES
from health_mlops.serving.ui.page import FUNCTION_ROLES, PAGE_EVENTS, Dashboard, build_dashboard, function_rules
from health_mlops.serving.ui.predict import FEDERATED_RISK, NEGLIGIBLE_RISK, NEGLIGIBLE_SHARE_OF_RANGE
from health_mlops.serving.ui.training import LATEST_RUN

__all__ = ["FEDERATED_RISK", "FUNCTION_ROLES", "HOSPITAL_COLUMN_TYPES", "INVALID_ROW_COLUMNS", "LATEST_RUN",
           "NEGLIGIBLE_RISK", "NEGLIGIBLE_SHARE_OF_RANGE", "OUTPUT_COLUMNS", "PAGE_EVENTS", "RESULTS_KEPT_S",
           "Dashboard", "build_dashboard", "function_rules"]
