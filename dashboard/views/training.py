"""Training: runs, models, charts of held-out MRR@10 and loss, dataset sources; train, promote, roll back."""

from __future__ import annotations

from flask import Blueprint, Response, render_template, request, url_for

from dashboard import actions, queries
from dashboard.backend import backend, read_store
from dashboard.charts import line_chart
from dashboard.views import form_action

bp = Blueprint("training", __name__)


@bp.get("/training")
def index() -> str:
    """The training page."""
    view = queries.training(read_store())
    charts = {"mrr": line_chart(view["mrr"], 560, 180, "held-out MRR@10 by model"),
              "loss": line_chart(view["loss"], 560, 180, "training loss by run")}
    return render_template("training.html", charts=charts, state=backend().status().get("training") or {}, **view)


@bp.post("/training/train")
def train() -> Response:
    """Queue a manual retrain."""
    def queue() -> str:
        done = backend().train(request.form.get("note", "").strip(), request.form.get("force") == "1")
        return "retrain queued" + ("; the trainer picks it up now" if done["daemon"] else
                                   "; it runs when the daemon starts")
    return form_action(queue, url_for("training.index"))


@bp.post("/training/rollback")
def rollback() -> Response:
    """Switch back to the model used before the current one."""
    def switch() -> str:
        return f"search now uses model {actions.switch_model(backend(), None)['id'][:12]}"
    return form_action(switch, url_for("training.index"))


@bp.post("/training/models/<model_id>/switch")
def switch_model(model_id: str) -> Response:
    """Promote an accepted model, or roll back to a retired one."""
    def switch() -> str:
        return f"search now uses model {actions.switch_model(backend(), model_id)['id'][:12]}"
    return form_action(switch, url_for("training.index"))
