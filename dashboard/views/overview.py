"""The overview: trainer, model, activity, watcher health, drift and recent failures."""

from __future__ import annotations

from flask import Blueprint, render_template

from dashboard import queries
from dashboard.backend import backend, read_store
from dashboard.charts import line_chart

bp = Blueprint("overview", __name__)


@bp.get("/")
def index() -> str:
    """The overview page."""
    view = queries.overview(backend(), read_store())
    charts = {table: line_chart(data["series"], 360, 120, f"{table} per hour")
              for table, data in view["activity"].items()}
    return render_template("overview.html", charts=charts, **view)
