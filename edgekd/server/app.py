"""The edgekd ServerApp: `flwr run .` and `edgekd simulate` both start it.

It reads the run's config (``context.run_config``, or the one `make_server_app` was
given) and runs `edgekd.server.pipeline.run_edgekd`, or the continual runner
(`edgekd.server.continual_run.run_continual`) when ``continual.scenario`` is set, or the
fleet runner (`edgekd.server.fleet_run.run_fleet`) when ``fleet.classes`` is.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from edgekd.core.config import EdgeKDConfig
from edgekd.server.pipeline import run_edgekd

log = logging.getLogger("edgekd")


def make_server_app(cfg: EdgeKDConfig | None = None, show_progress: bool = True) -> ServerApp:
    """A ServerApp bound to ``cfg``; with None it reads the run's ``run_config``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else EdgeKDConfig.from_run_config(context.run_config)
        if run_cfg.continual.scenario:  # `flwr run .` with continual.scenario set
            from edgekd.server.continual_run import run_continual

            out = run_continual(grid, run_cfg, show_progress=show_progress)
        elif run_cfg.fleet.classes:  # a student per device class
            from edgekd.server.fleet_run import run_fleet

            out = run_fleet(grid, run_cfg, show_progress=show_progress)
        else:
            out = run_edgekd(grid, run_cfg, show_progress=show_progress)
        log.info("edgekd: report written to %s", out / "report.json")

    return server_app


app = make_server_app()
