"""The page: `Dashboard`, every tab's callbacks on one object, and `build_dashboard`, the Gradio page that lays the
tabs out and wires their events; which role may run each callback (`FUNCTION_ROLES`, `function_rules`)."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from health_mlops.serving.access_edge import FunctionRule
from health_mlops.serving.ui.batch import INVALID_ROW_COLUMNS, BatchTab
from health_mlops.serving.ui.hospitals import HOSPITAL_COLUMN_TYPES, HospitalsTab
from health_mlops.serving.ui.models import ModelsTab
from health_mlops.serving.ui.monitoring import MonitoringTab
from health_mlops.serving.ui.predict import FEDERATED_RISK, PredictTab
from health_mlops.serving.ui.training import LATEST_RUN, TrainingTab
from health_mlops.trust.access import Role, allows


class Dashboard(PredictTab, BatchTab, TrainingTab, HospitalsTab, ModelsTab, MonitoringTab):
    """The callbacks behind the tabs (each tab's in its module); each returns what its outputs show and never raises
    at the user. Here, what the whole page runs: who sees what, and the one look at the federation that feeds both
    the Training and the Hospitals tabs."""

    def view(self, request: gr.Request) -> tuple[Any, ...]:
        """What the user's role shows: who is logged in; for an operator the Training, Models, Hospitals and
        Monitoring tabs and their refreshes; for an admin the promote and roll back actions. (Hiding is for the
        user's sake: the edge refuses another role's functions whatever the page shows.)"""
        user = request.username or ""
        role = self.role_of(user)
        operator = role is not None and allows(role, "operator")
        admin = role is not None and allows(role, "admin")
        who = f"Logged in as **{user}** ({role or 'no role'})"
        model = self.predictor.current
        sites = sorted(model.sites) if model is not None else []
        return (who, *(gr.Tab(visible=operator) for _ in range(4)), gr.Row(visible=admin),
                gr.Timer(active=operator), gr.Timer(active=operator),
                gr.Dropdown(choices=[FEDERATED_RISK, *sites], value=FEDERATED_RISK, visible=bool(sites)))

    @staticmethod
    def opened() -> gr.Timer:
        """Stops the one-shot timer that loads an operator's tabs when the page opens."""
        return gr.Timer(active=False)

    def federation(self, selected: str | None = None) -> tuple[Any, ...]:
        """The Training and Hospitals tabs, from one look at the federation; Training shows run `selected` (the
        latest run if none is picked or it is gone)."""
        state = self.sources.federation()
        return (*self.training(state, selected), *self.hospitals(state))


def build_dashboard(dashboard: Dashboard, *, refresh_s: float = 2.0) -> gr.Blocks:
    spec = dashboard.spec
    model = dashboard.predictor.current
    typical = model.typical if model else None
    # Uploaded files (patient rows) are swept every 10 minutes once an hour old, and all at shutdown.
    with gr.Blocks(title=f"Health MLOps: {spec.display_title}", delete_cache=(600, 3600)) as blocks:
        gr.Markdown(f"# {spec.display_title}\n{spec.description}")
        if spec.intended_use:
            gr.Markdown(f"**Intended use:** {spec.intended_use}", elem_id="intended-use")
        if dashboard.links:
            gr.Markdown("Also: " + " · ".join(f"[{name}]({url})" for name, url in dashboard.links.items()),
                        elem_id="links")
        with gr.Row():
            who = gr.Markdown(elem_id="logged-in")
            # A form, not a link: logging out is a POST (no page elsewhere can log a user out by linking here).
            gr.HTML('<form method="post" action="/logout"><button type="submit" id="logout">Log out</button></form>')
        with gr.Tab("Predict"):
            inputs: list[gr.components.Component] = []
            sources = list(dict.fromkeys(f.source.value for f in spec.features))
            for source in sources:
                gr.Markdown(f"**{source.replace('_', ' ')}**")
                with gr.Row():
                    for j, feature in enumerate(spec.features):
                        if feature.source.value != source:
                            continue
                        label = feature.display_label + (f" ({feature.unit})" if feature.unit else "")
                        help_text = feature.description
                        if feature.type == "numeric":
                            value = round(typical[j], feature.display_decimals) if typical else feature.min
                            inputs.append(gr.Number(label=label, value=value, elem_id=f"input-{feature.name}",
                                                    info=f"{help_text} ({feature.allowed()})", min_width=160))
                        else:
                            categories = list(feature.categories or ())
                            choice = categories[int(typical[j])] if typical else categories[0]
                            choices = [("No", "0"), ("Yes", "1")] if feature.is_yes_no else categories
                            inputs.append(gr.Radio(choices, value=choice, label=label, info=help_text,
                                                   elem_id=f"input-{feature.name}", min_width=160))
            # Shown when the champion carries hospitals' recalibrations (`view` fills it when the page opens).
            site = gr.Dropdown(label="risk as", choices=[FEDERATED_RISK], value=FEDERATED_RISK, visible=False,
                               elem_id="predict-hospital", info="the federated model, or as a hospital recalibrated "
                               "it on its own patients")
            predict_button = gr.Button("Predict", variant="primary", elem_id="predict-button")
            with gr.Row():
                risk = gr.Markdown(elem_id="prediction")
                contributions = gr.Plot(label="main contributing features")
            predict_button.click(dashboard.predict, [*inputs, site], [risk, contributions])
        with gr.Tab("Batch"):
            gr.Markdown("Upload a CSV with one column per feature; download it back with the risk in percent "
                        "(`risk_percent`), the probability for programs (`prediction`) and `class` (flagged at the "
                        "model's threshold). Other columns, such as a patient id, come back unchanged beside their "
                        "rows. Invalid rows are listed with the patient id, their line and the reason, never dropped "
                        "silently.")
            gr.DownloadButton("Download a template CSV", value=dashboard.template, elem_id="batch-template")
            upload = gr.File(label="patients CSV", file_types=[".csv"], type="filepath", elem_id="batch-upload")
            batch_summary = gr.Markdown(elem_id="batch-summary")
            scored_file = gr.File(label="predictions CSV", elem_id="batch-result")
            first_rows = gr.Dataframe(label="first rows of the results", elem_id="batch-preview")
            invalid_rows = gr.Dataframe(pd.DataFrame(columns=INVALID_ROW_COLUMNS), label="invalid rows",
                                        elem_id="batch-invalid")
            upload.upload(dashboard.batch, upload, [batch_summary, scored_file, invalid_rows, first_rows])
        with gr.Tab("Training", visible=False) as training_tab:
            run_picker = gr.Dropdown(label="training run", choices=[LATEST_RUN], value=LATEST_RUN,
                                     elem_id="training-run")
            training_note = gr.Markdown(elem_id="training-source")
            overall_plot = gr.Plot(label="global model", elem_id="training-global")
            with gr.Row():
                hospital_plot = gr.Plot(label="each hospital's evaluation", elem_id="training-hospitals")
                loss_plot = gr.Plot(label="local training loss", elem_id="training-loss")
            participation_plot = gr.Plot(label="participation", elem_id="training-participation")
        with gr.Tab("Models", visible=False) as models_tab:
            versions = gr.Dataframe(label="registered versions (newest first)", elem_id="model-versions")
            with gr.Row(visible=False) as admin_row:
                version = gr.Dropdown(label="version to promote", choices=[], value=None, elem_id="promote-version")
                promote_button = gr.Button("Promote to champion")
                rollback_button = gr.Button("Roll back to the previous champion")
            admin_result = gr.Markdown(elem_id="admin-result")
            report_summary = gr.Markdown(elem_id="model-report")
            report_table = gr.Dataframe(label="the champion on each hospital's test rows", elem_id="model-report-table")
            with gr.Row():
                roc_plot = gr.Plot(label="ROC", elem_id="model-roc")
                calibration_plot = gr.Plot(label="calibration", elem_id="model-calibration")
            report_outputs = [report_summary, report_table, roc_plot, calibration_plot]
            with gr.Row():
                compare_first = gr.Dropdown(label="compare version", choices=[], elem_id="compare-first")
                compare_second = gr.Dropdown(label="with version", choices=[], elem_id="compare-second")
            comparison_summary = gr.Markdown(elem_id="model-comparison")
            comparison_table = gr.Dataframe(label="the two versions on each hospital's test rows",
                                            elem_id="model-comparison-table")
            for picker in (compare_first, compare_second):
                picker.change(dashboard.compare, [compare_first, compare_second],
                              [comparison_summary, comparison_table])
            promote_button.click(dashboard.promote, version, [admin_result, versions]).then(
                dashboard.champion_report, None, report_outputs)
            rollback_button.click(dashboard.rollback, None, [admin_result, versions]).then(
                dashboard.champion_report, None, report_outputs)
        with gr.Tab("Hospitals", visible=False) as hospitals_tab:
            hospitals_note = gr.Markdown()
            hospitals_table = gr.Dataframe(elem_id="hospitals", datatype=HOSPITAL_COLUMN_TYPES)
        with gr.Tab("Monitoring", visible=False) as monitoring_tab:
            monitoring_summary = gr.Markdown(elem_id="monitoring")
            drift_table = gr.Dataframe(label="input drift by feature", elem_id="drift")
        # An operator's tabs load once when the page opens (`opened`, a one-shot timer) and refresh every
        # `refresh_s` (`timer`); a clinician's page runs neither, so it never asks for what its role may not see.
        timer = gr.Timer(refresh_s, active=False)
        opened = gr.Timer(0.1, active=False)
        blocks.load(dashboard.view, None, [who, training_tab, models_tab, hospitals_tab, monitoring_tab, admin_row,
                                           timer, opened, site])
        federation_outputs = [run_picker, training_note, overall_plot, hospital_plot, loss_plot, participation_plot,
                              hospitals_note, hospitals_table]
        # The one-shot tick only stops its timer; the tabs load after it. Loaded on the tick itself, a busy machine
        # let a second tick through before the first stopped the timer, and its late answer reset the pickers
        # over the user's pick.
        opening = opened.tick(dashboard.opened, None, opened, trigger_mode="once")
        for event in (opening.then, timer.tick, run_picker.input):
            event(dashboard.federation, run_picker, federation_outputs)
            event(dashboard.monitoring, None, [monitoring_summary, drift_table])
        opening.then(dashboard.registered, None, [versions, version, compare_first, compare_second])
        opening.then(dashboard.champion_report, None, report_outputs)
    return blocks


# Who may run each of the dashboard's functions (by the callback's name); a function missing here fails the build.
FUNCTION_ROLES: dict[str, Role] = {
    "view": "clinician", "template": "clinician", "predict": "clinician", "batch": "clinician",
    "federation": "operator", "monitoring": "operator", "registered": "operator", "champion_report": "operator",
    "compare": "operator", "opened": "operator",
    "promote": "admin", "rollback": "admin",
}
PAGE_EVENTS = ("load", "tick")  # what the page does by itself: running these is not the user's activity


def function_rules(blocks: gr.Blocks) -> dict[int, FunctionRule]:
    """Each of the blocks' functions (by the index a Gradio event names) with the role it needs."""
    rules: dict[int, FunctionRule] = {}
    for index, function in blocks.fns.items():
        if function.fn is None:  # a front-end-only event: nothing runs on the server
            continue
        if function.name not in FUNCTION_ROLES:
            raise ValueError(f"the dashboard function {function.name!r} has no role in FUNCTION_ROLES")
        user_action = any(event not in PAGE_EVENTS for _, event in function.targets)
        rules[index] = FunctionRule(FUNCTION_ROLES[function.name], user_action)
    return rules
