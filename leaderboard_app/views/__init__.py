"""One module per page; each exposes ``render(ctx)`` (ctx: leaderboard_app.common.Ctx, None without a store
for the pages that work without one)."""

from leaderboard_app.views import compare, fidelity, leaderboard, objectives, run_detail

PAGES = {
    "Leaderboard": leaderboard.render,
    "Fidelity vs diversity": fidelity.render,
    "Run detail": run_detail.render,
    "Compare": compare.render,
    "Objectives": objectives.render,
}
