"""The speedrun's stages, declared once: the local runner, the Kubernetes operator and TorchX all read this.

A Step is one run of a stage module (chat_eval runs three times, once per checkpoint source).
Steps whose module does not exist yet are left out (no stub stages that pretend to work).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

from nanochat import profiles

GPU_PROFILES = ("d20", "d24", "d26")
CPU_PROFILES = ("tiny", "ci")


@dataclass(frozen=True)
class Step:
    name: str                      # instance name: stages/<name>/done.json in the store
    module: str                    # nanochat.stages.<module>
    args: tuple[str, ...] = ()     # extra flags for this instance (e.g. --source=mid)
    depends_on: tuple[str, ...] = ()
    background: bool = False       # the runner starts it and moves on; dependents wait for it
    only_profiles: tuple[str, ...] | None = None
    gpu: bool = False              # uses GPUs when the profile has them
    optional: bool = False         # off unless enabled (chat_rl on GPU profiles, as in nanochat)
    description: str = ""

    def nproc(self, profile: str) -> int:
        return profiles.nproc(profile, self.module) if self.gpu else 1

    @property
    def module_path(self) -> str:
        """Importable module; a dotted name is taken as-is (tests run their own stage modules)."""
        return self.module if "." in self.module else f"nanochat.stages.{self.module}"


STEPS: list[Step] = [
    Step("data", "data", description="text shards: the embedded corpus (tiny) or the first FineWeb-Edu shards"),
    Step("data_rest", "data", args=("--part=rest",), depends_on=("data",), background=True, only_profiles=GPU_PROFILES,
         description="the remaining shards, downloaded while the tokenizer trains"),
    Step("task_data", "task_data", only_profiles=GPU_PROFILES, background=True, description="chat task datasets (SmolTalk, MMLU, GSM8K, ...)"),
    Step("tok_train", "tok_train", depends_on=("data",), description="train the BPE tokenizer"),
    Step("tok_eval", "tok_eval", depends_on=("tok_train",), description="tokenizer compression report"),
    Step("eval_bundle", "eval_bundle", only_profiles=GPU_PROFILES, description="fetch the CORE eval bundle"),
    Step("base_train", "base_train", depends_on=("tok_train", "data_rest"), gpu=True, description="pretrain the base model"),
    Step("base_eval", "base_eval", depends_on=("base_train", "eval_bundle"), gpu=True, description="bpb, samples, CORE"),
    Step("chat_eval_base", "chat_eval", args=("--source=base",), depends_on=("base_train",), only_profiles=CPU_PROFILES, gpu=True,
         description="synthetic-task accuracy of the base model (the report card's BASE column on CPU profiles)"),
    Step("mid_train", "mid_train", depends_on=("base_train", "task_data"), gpu=True, description="midtraining: conversations, tools, multiple choice"),
    Step("chat_eval_mid", "chat_eval", args=("--source=mid",), depends_on=("mid_train",), gpu=True, description="ChatCORE of the mid model"),
    Step("chat_sft", "chat_sft", depends_on=("mid_train",), gpu=True, description="supervised finetuning"),
    Step("chat_eval_sft", "chat_eval", args=("--source=sft",), depends_on=("chat_sft",), gpu=True, description="ChatCORE of the SFT model"),
    Step("chat_rl", "chat_rl", depends_on=("chat_sft",), gpu=True, optional=True, description="RL on GSM8K-style problems"),
    Step("chat_eval_rl", "chat_eval", args=("--source=rl",), depends_on=("chat_rl",), gpu=True, optional=True, description="ChatCORE of the RL model"),
]

MODULES = list(dict.fromkeys(s.module for s in STEPS))


def stage_names() -> list[str]:
    """Stage module names (config-file sections are keyed by these)."""
    return MODULES


def module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module if "." in module else f"nanochat.stages.{module}") is not None
    except ModuleNotFoundError:
        return False


def steps_for(profile: str, rl: bool | None = None, steps: list[Step] | None = None) -> list[Step]:
    """The steps a profile runs, in order; RL is on by default for CPU profiles, opt-in on GPU ones."""
    rl = (profile not in GPU_PROFILES) if rl is None else rl
    out = []
    for s in steps or STEPS:
        if s.only_profiles and profile not in s.only_profiles:
            continue
        if s.optional and not rl:
            continue
        if not module_exists(s.module):
            continue
        out.append(s)
    names = {s.name for s in out}
    # dependencies on steps a profile skips (or that do not exist yet) are dropped
    return [dataclasses.replace(s, depends_on=tuple(d for d in s.depends_on if d in names)) for s in out]
