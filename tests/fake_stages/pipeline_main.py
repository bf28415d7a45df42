"""Drive a Runner over test stages from a subprocess (so tests can SIGKILL/SIGINT the runner itself)."""
import json
import sys

from nanochat.pipeline import Step
from nanochat.runner import Runner
from nanochat.store import open_store


def main():
    store_uri, spec = sys.argv[1], json.loads(sys.argv[2])
    steps = [Step(name=s["name"], module=s["module"], args=tuple(s.get("args", ())), depends_on=tuple(s.get("depends_on", ())),
                  background=s.get("background", False)) for s in spec["steps"]]
    runner = Runner(open_store(store_uri), steps, spec.get("profile", "tiny"), max_retries=spec.get("max_retries", 1), backoff_s=0.2)
    sys.exit(0 if runner.run(only=spec.get("only")) else 1)


if __name__ == "__main__":
    main()
