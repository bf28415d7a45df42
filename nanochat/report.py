"""The report card: one markdown section per stage, plots, a summary table, written to the store.

Stages call `Report(store).log(section, data)`; `generate()` stitches header + sections (in
pipeline order) + the BASE/MID/SFT/RL table + loss curves into report/report.md.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import platform
import socket
import subprocess
import time
from importlib import metadata

from nanochat.store import ObjectNotFound, Store

CARD_COLUMNS = ["BASE", "MID", "SFT", "RL"]
DEFAULT_GPU_HOUR_COST = float(os.environ.get("NANOCHAT_GPU_HOUR_COST", "3.0"))  # $/GPU-hour (8×H100 ≈ $24/h)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def render_data(data) -> str:
    """dict → bullet list, list of dicts → table, str → itself."""
    if isinstance(data, str):
        return data.rstrip() + "\n"
    if isinstance(data, dict):
        return "".join(f"- {k}: {_fmt(v)}\n" for k, v in data.items())
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        cols = list(dict.fromkeys(k for r in data for k in r))
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in data]
        return "\n".join(lines) + "\n"
    if isinstance(data, list):
        return "".join(render_data(d) + "\n" for d in data)
    return f"{data}\n"


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + (" (dirty)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return os.environ.get("NANOCHAT_GIT_COMMIT", "unknown")


def environment() -> dict:
    import torch
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git commit": git_commit(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "CPU": platform.processor() or platform.machine(),
        "CPU cores": os.cpu_count(),
        "dependencies installed": sum(1 for _ in metadata.distributions()),
    }
    if torch.cuda.is_available():
        env["GPU"] = f"{torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}"
    else:
        env["GPU"] = "none"
    return env


class Report:
    """Per-stage markdown sections and figures under report/ in the store."""

    def __init__(self, store: Store):
        self.store = store

    def log(self, section: str, data, figures: dict[str, bytes] | None = None, name: str | None = None):
        """Write (replace) the section of one stage run: report/<name>.md plus report/figures/*.png."""
        name = name or section.lower().replace(" ", "_")
        md = f"## {section}\n\n_written {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}_\n\n"
        md += render_data(data)
        for fig_name, png in (figures or {}).items():
            self.store.put_bytes(f"report/figures/{fig_name}.png", png)
            md += f"\n![{fig_name}](figures/{fig_name}.png)\n"
        self.store.put_bytes(f"report/{name}.md", md.encode())

    def reset(self, extra: dict | None = None):
        """Start a new report: remove old sections, record the environment header and start time."""
        for key in self.store.list("report/"):
            self.store.delete(key)
        header = {**environment(), **(extra or {}), "started": time.time()}
        self.store.put_json("report/header.json", header)

    def generate(self, stage_order: list[str] | None = None, gpu_hour_cost: float = DEFAULT_GPU_HOUR_COST) -> str:
        """Compose report/report.md and return its text."""
        header = self.store.get_json_or("report/header.json") or {**environment(), "started": None}
        dones = load_done_markers(self.store)
        order = stage_order or sorted(dones)
        sections = [k for k in self.store.list("report/") if k.endswith(".md") and k != "report/report.md"]
        names = [k[len("report/"):-3] for k in sections]
        ordered = [n for n in order if n in names] + sorted(n for n in names if n not in order)

        out = ["# nanochat report card\n"]
        out.append(render_data({k: v for k, v in header.items() if k != "started"}))
        total_s = sum(d.get("duration_s", 0) for d in dones.values())
        gpus = header.get("gpus_for_cost") or _gpu_count()
        out.append(f"\n- total wall time (sum of stages): {human_duration(total_s)}")
        if gpus:
            out.append(f"- estimated cost: ${total_s / 3600 * gpus * gpu_hour_cost:,.2f} ({gpus} GPU × ${gpu_hour_cost}/GPU-hour)")
        out.append("")
        card = report_card(dones)
        if card:
            out.append("## Summary\n")
            out.append(card)
        timing = [{"stage": n, "state": "done", "duration": human_duration(d.get("duration_s", 0)), "world size": d.get("world_size", 1)}
                  for n, d in sorted(dones.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 999)]
        if timing:
            out.append("\n## Stage timings\n")
            out.append(render_data(timing))
        plots = self._plots(dones, order)
        for fig in plots:
            out.append(f"\n![{fig}](figures/{fig}.png)\n")
        for n in ordered:
            out.append("\n" + self.store.get_bytes(f"report/{n}.md").decode())
        text = "\n".join(out)
        self.store.put_bytes("report/report.md", text.encode())
        return text

    def _plots(self, dones: dict, order: list[str]) -> list[str]:
        """Loss and throughput curves from each stage's history.jsonl, as PNGs in report/figures/."""
        histories = {n: load_history(self.store, n) for n in dones}
        histories = {n: h for n, h in histories.items() if h}
        if not histories:
            return []
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        made = []
        for metric, fig_name, ylabel in [("loss", "loss_curves", "train loss"), ("val_bpb", "val_bpb", "validation bits per byte"),
                                         ("tokens_per_sec", "throughput", "tokens/s")]:
            series = {n: [(r["step"], r[metric]) for r in h if metric in r and "step" in r] for n, h in histories.items()}
            series = {n: s for n, s in series.items() if s}
            if not series:
                continue
            fig, ax = plt.subplots(figsize=(7, 4))
            for n in sorted(series, key=lambda n: order.index(n) if n in order else 999):
                xs, ys = zip(*series[n])
                ax.plot(xs, ys, label=n, marker="." if len(xs) < 30 else None)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
            buf = io.BytesIO()
            fig.tight_layout()
            fig.savefig(buf, format="png", dpi=100)
            plt.close(fig)
            self.store.put_bytes(f"report/figures/{fig_name}.png", buf.getvalue())
            made.append(fig_name)
        return made


def _gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def load_done_markers(store: Store) -> dict[str, dict]:
    out = {}
    for key in store.list("stages/"):
        if key.endswith("/done.json"):
            try:
                out[key.split("/")[1]] = store.get_json(key)
            except (ObjectNotFound, json.JSONDecodeError):
                continue
    return out


def load_history(store: Store, name: str) -> list[dict]:
    try:
        raw = store.get_bytes(f"stages/{name}/history.jsonl").decode()
    except ObjectNotFound:
        return []
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def report_card(dones: dict[str, dict]) -> str:
    """The BASE/MID/SFT/RL table from the `card` entries stages put in their done.json."""
    rows: dict[str, dict[str, float]] = {}
    for d in dones.values():
        card = d.get("card") or {}
        col = card.get("column")
        for metric, value in (card.get("values") or {}).items():
            rows.setdefault(metric, {})[col] = value
    if not rows:
        return ""
    cols = [c for c in CARD_COLUMNS if any(c in r for r in rows.values())]
    cols += sorted({c for r in rows.values() for c in r} - set(cols))
    lines = ["| Metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for metric, r in rows.items():
        lines.append(f"| {metric} | " + " | ".join(_fmt(r[c]) if c in r else "-" for c in cols) + " |")
    return "\n".join(lines) + "\n"
