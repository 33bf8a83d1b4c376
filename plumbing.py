"""plumbing: what keeps a dipp run alive, and none of what DI++ is.

`dipp.py` holds the method (generator, teacher with CFG, fake score, reward interface, losses, Alg. 1); this
module holds the machinery around it: one-line errors, the command line built from a dataclass and its checks,
where models come from (a missing path or an unreachable hub is one line at once), devices and processes
(torchrun: DDP, or FSDP2 sharding), the optimizer step with its numerical guards (SafeOptimizer), trainable-
parameter bookkeeping and EMA, LoRA adapters on a shared base, gradient checkpointing of reward towers,
torch.compile, checkpoints (save, list, keep-last-K, resume), logs and signals, the exported generator folder,
sample-grid PNGs, the benchmark report with its FLOP counter, and the RunKeeper that dipp.train drives.

It is the bottom layer: it imports no other module of the project (test_dipp.py::test_no_import_cycles) and
knows none of the method's settings; everything it needs is passed in (the networks to save, the generator's
t*, the optimizers, the run's folder and bookkeeping flags).
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import sys

import torch

# -----------------------------------------------------------------------------
# 1. One-line errors, the command line, where models come from, loading


PROGRAM = "dipp"  # the name one-line errors start with; evaluate.py speaks for itself with as_program


def die(message):
    """One clear line instead of a traceback: what is wrong and how to fix it."""
    raise SystemExit(f"{PROGRAM}: error: {message}")


def all_or_die(*checks):
    """Run every check (a callable that stops with die's one line on a missing download or a bad value) and report
    all that failed in one message, not one per attempt: a user offline learns every missing piece at once.
    Returns the checks' results. (A check that itself reported several problems adds each of them.)"""
    results, problems = [], []
    for check in checks:
        try:
            results.append(check())
        except SystemExit as e:
            if not str(e).startswith(f"{PROGRAM}: error: "):
                raise
            problems += getattr(e, "problems", None) or [str(e).split(": error: ", 1)[1]]
            results.append(None)
    if len(problems) == 1:
        die(problems[0])
    if problems:
        error = SystemExit(f"{PROGRAM}: error: {len(problems)} problems, each to fix before this run: "
                           + " ".join(f"({i}) {p}" for i, p in enumerate(problems, 1)))
        error.problems = problems
        raise error
    return results


@contextlib.contextmanager
def as_program(name):
    """Inside the block every one-line error, this module's and its callers', starts with `name`: evaluate.py
    runs dipp's loaders, and their messages then speak for evaluate."""
    global PROGRAM
    previous, PROGRAM = PROGRAM, name
    try:
        yield
    finally:
        PROGRAM = previous


def load_or_die(fn, name, what):
    """Call a from_pretrained-style loader; turn 'not found / offline / wrong path' into one line."""
    if looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        die(f"cannot load {what}: the path '{name}' does not exist")
    offline = None if os.path.exists(os.path.expanduser(name)) else hub_unreachable()  # (no retry noise offline)
    try:
        return fn()
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if os.path.exists(os.path.expanduser(name)):  # a local folder that is not what it should be
            die(f"cannot load {what} from the local folder '{name}' ({first[:200]}); check that it holds that model")
        if "not a valid model identifier" in str(e) or "gated" in str(e).lower():  # (diffusers: 404 or gated alike)
            die(f"cannot load {what} from '{name}': the hub has no such model, or it is gated or private ({first[:120]}"
                f"); check the id, and for a gated model (SD3.5 is) accept its licence at https://huggingface.co/{name} "
                "and log in (`huggingface-cli login`, or set HF_TOKEN)")
        if offline:
            die(f"cannot load {what} from '{name}': it has not been downloaded and the hub cannot be reached "
                f"({offline}). On a machine with internet run `huggingface-cli download {name}` (then it loads "
                "from the cache), or pass a local folder")
        die(f"cannot load {what} from '{name}' ({first[:200]}). On a machine with internet run "
            f"`huggingface-cli download {name}` (then it loads from the cache), or pass a local folder")


# Where a model comes from: a local path, or a hub id ("namespace/name") fetched into the hub cache. A name that
# can only be a path is never sent to the hub, and with no network the hub is not asked at all: diffusers and
# transformers would otherwise retry for ~30 s and then advise downloading a folder that was merely mistyped.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
HUB_URL_WORDS = ("models", "datasets", "spaces")  # huggingface.co/<these> are pages, so no user or org has the name


def looks_local(name):
    """True when `name` can only be a file-system path: it starts with . / ~, has no '/' or more than one, is
    not shaped like a hub id, or its first part is a folder here (models/sd15 when ./models exists)."""
    first = name.split("/")[0]
    return (name.startswith((".", "/", "~")) or "\\" in name or not HUB_ID.fullmatch(name)
            or first in HUB_URL_WORDS or os.path.isdir(first))


def in_hub_cache(name):
    """Whether hub repo `name` has a snapshot in the local hub cache (HF_HOME / HF_HUB_CACHE respected)."""
    from huggingface_hub.constants import HF_HUB_CACHE
    snapshots = os.path.join(HF_HUB_CACHE, "models--" + name.replace("/", "--"), "snapshots")
    return os.path.isdir(snapshots) and bool(os.listdir(snapshots))


@functools.lru_cache(maxsize=None)
def hub_unreachable():
    """None if the Hugging Face hub may be reachable, else why not. An unreachable hub switches huggingface_hub,
    diffusers and transformers to offline mode (HF_HUB_OFFLINE=1): loads then read the hub cache at once instead
    of retrying. Asked once per process, with a 5 s connection attempt; behind a proxy the hub is assumed reachable."""
    import socket
    import urllib.parse
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return None
    except OSError as e:
        reason = f"no connection to {host}: {e.strerror or type(e).__name__}"
    os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries imported from now on; those already imported, below
    for module, attribute in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("diffusers.utils.hub_utils", "HF_HUB_OFFLINE"),
                              ("transformers.utils.hub", "_is_offline_mode")):
        if hasattr(sys.modules.get(module), attribute):
            setattr(sys.modules[module], attribute, True)
    return reason


def check_model_location(name, flag):
    """One line, before anything loads or any folder is made, when `name` (a flag's value) cannot be a model:
    a path that does not exist (the hub is not asked), or a hub id that is neither in the hub cache nor
    downloadable because the hub cannot be reached. What is there is checked later, by the loaders."""
    import difflib
    path = os.path.expanduser(name)
    if os.path.exists(path):
        return
    if looks_local(name):
        parent = os.path.dirname(os.path.normpath(path)) or "."
        if not os.path.isdir(parent):
            die(f"{flag} '{name}' does not exist (nor does its folder '{parent}'); check the path")
        close = difflib.get_close_matches(os.path.basename(os.path.normpath(path)), os.listdir(parent), n=1)
        hint = f"; did you mean '{os.path.join(os.path.dirname(name), close[0])}'?" if close else "; check the path"
        die(f"{flag} '{name}' does not exist{hint}")
    offline = hub_unreachable()
    if offline and not in_hub_cache(name):
        die(f"{flag} '{name}' is a hub id that is not in the hub cache, and the hub cannot be reached ({offline}). "
            f"On a machine with internet run `huggingface-cli download {name}` (add --local-dir DIR and pass "
            "DIR instead to keep it in a folder of your own)")


def model_locations(cfg):
    """(name, flag) of every model folder or hub id a dipp.py run loads besides the rewards (rewards.check_flags
    finds theirs). A default TAESD is the family's."""
    decoder = cfg.reward_decoder_path if cfg.reward_decoder == "tiny" and cfg.reward != "none" else ""
    return [(name, flag) for name, flag in ((cfg.pretrained_model_name_or_path, "--pretrained_model_name_or_path"),
                                            (cfg.generator_init, "--generator_init"),
                                            (decoder, "--reward_decoder_path")) if name]


def check_model_locations(locations):
    """check_model_location for each (name, flag) a run will load; every one missing, in one message."""
    all_or_die(*(functools.partial(check_model_location, name, flag) for name, flag in locations))


def load_weights_or_die(module, path):
    """Load a bare state-dict file (read_weights) into module; wrong keys or shapes are one line."""
    return load_strictly(module, read_weights(path), f"the weight file '{path}'",
                         f"the teacher's {type(module).__name__} config")


def read_weights(path):
    """The tensors of a .safetensors file, or of a torch .bin/.pt/.pth read with weights_only=True so that a file
    someone sends you cannot run code; a missing or unreadable file is one line."""
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        die(f"the weight file '{path}' does not exist")
    try:
        return load_file(path) if path.endswith(".safetensors") else torch.load(path, map_location="cpu",
                                                                                weights_only=True)
    except Exception as e:  # truncated, not this format, or a pickle with code in it
        die(f"the weight file '{path}' cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")


def load_strictly(module, weights, source, what):
    """module.load_state_dict(weights) when every key of both fits with its shape, else one line naming the keys
    that are missing from `source`, those it has beyond `what`, and those of another shape. (Loaders that pass
    strict=False, as ImageReward's does, would leave the misfits silently at their random initialisation.)"""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(getattr(v, "shape", (-1,))) for k, v in weights.items()} if isinstance(weights, dict) else {}
    misfits = {"missing": [k for k in expected if k not in got], "unexpected": [k for k in got if k not in expected],
               "of another shape": [k for k in expected if k in got and got[k] != expected[k]]}
    if any(misfits.values()) or not got:
        listed = "; ".join(f"{len(keys)} {kind}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                           for kind, keys in misfits.items() if keys)
        die(f"{source} does not match {what} ({len(got)} tensors, {len(expected)} expected; "
            f"{listed if got else 'not a state dict'})")
    module.load_state_dict(weights)
    return module


def check_model_class(name, sub, expected):
    """One line when a local model folder holds another architecture than the teacher's (an SD generator
    given with a PixArt-α teacher, or the reverse), instead of a loader error about attention heads."""
    config = os.path.join(name, sub or "", "config.json")
    if os.path.isfile(config):
        found = json.load(open(config)).get("_class_name", "")
        if found and found not in expected:
            die(f"the generator '{name}' holds a {found}, but the teacher (--pretrained_model_name_or_path) uses "
                f"a {expected[0]}; pass a generator of the teacher's family, or that family's teacher")


def find_subfolder(name, sub):
    """`sub` when the local folder or hub repo `name` keeps the model in sub/ (a pipeline layout such as
    PixArt-α-DMD's transformer/ + scheduler/), else None (the model's own folder: config.json at the top)."""
    if os.path.isdir(name):
        return sub if os.path.isfile(os.path.join(name, sub, "config.json")) else None
    from huggingface_hub import hf_hub_download
    try:
        hf_hub_download(name, "config.json", subfolder=sub)
        return sub
    except Exception:  # not found, or offline and not cached: load from the top and let that error speak
        return None


def from_pretrained_any_variant(cls, name, subfolder, **kwargs):
    """cls.from_pretrained(name, subfolder=...), or, when the folder or hub repo holds the weights only as the fp16
    variant (diffusion_pytorch_model.fp16.safetensors, as XDG-XHS/dipp_1step and the other Diff-Instruct SDXL
    releases keep their unet/), that variant: diffusers reads a variant file only when asked for it by name."""
    try:
        return cls.from_pretrained(name, subfolder=subfolder, **kwargs)
    except OSError as plain:  # (no weights file of the plain name; anything else fails the same way again)
        try:
            return cls.from_pretrained(name, subfolder=subfolder, variant="fp16", **kwargs)
        except OSError:
            raise plain from None


def writable_dir(path, flag="--output_dir"):
    """Create path if needed and prove it can be written: one line now instead of a crash at the first save."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        die(f"{flag} '{path}' cannot be written ({e.strerror}); choose a folder you can write to")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help that reads: each default shown once (not when the help text already names it, and never an
    empty one), the description's example commands kept as written."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=36)

    def _get_help_string(self, action):
        text = (action.help or "").replace("%", "%%")
        if action.default is None or action.default is False or action.default in ("", [], argparse.SUPPRESS) \
                or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)"

    def _split_lines(self, text, width):  # never break a hub id or a flag at its hyphens
        import textwrap
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


class FlagParser(argparse.ArgumentParser):
    """argparse with exact flag names only (no silent abbreviations: --max_train_step is not --max_train_steps)
    and every mistake in one line: all unknown flags (each naming the closest real ones) and all bad values
    together, not one per attempt. `renamed` maps an old flag to what replaced it."""

    def __init__(self, prog, description, renamed=None):
        super().__init__(prog=prog, description=description, allow_abbrev=False, formatter_class=HelpFormatter,
                         usage=f"python {prog} [--flag VALUE ...]   (python {prog} --help lists them all)")
        self.renamed, self.problems = renamed or {}, []

    def error(self, message):
        raise SystemExit(f"{self.prog.removesuffix('.py')}: error: {message} (see python {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        self.problems = []  # bad values, noted as argparse meets them (_get_value, _check_value) instead of stopping
        parsed, extra = self.parse_known_args(args, namespace)
        problems = self.problems + self.unknown(extra)
        if problems:
            self.error(("" if len(problems) == 1 else f"{len(problems)} problems: ") + "; ".join(problems))
        return parsed

    def _get_value(self, action, arg_string):  # a value its type cannot read: noted, parsing goes on
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as e:
            self.problems.append(str(e))
            return action.default

    def _check_value(self, action, value):  # a value outside its choices: noted, parsing goes on
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as e:
            self.problems.append(str(e))

    def unknown(self, extra):
        """One phrase per unknown flag (and one for stray values), each naming the closest real flags."""
        import difflib
        names = [s[2:] for a in self._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
        found = []
        for token in extra:
            if token.startswith("-"):
                name = token.split("=")[0]
                if name in self.renamed:
                    found.append(f"{name} is now {self.renamed[name]}")
                    continue
                typed = name.lstrip("-")  # an abbreviation's completions first, then names spelled alike
                close = [n for n in names if n.startswith(typed)] + difflib.get_close_matches(typed, names, 3, 0.6)
                close = [f"--{n}" for n in dict.fromkeys(close)][:3]
                found.append(f"unknown flag {name}" + (f"; did you mean {' or '.join(close)}?" if close else ""))
        stray = [t for i, t in enumerate(extra) if not t.startswith("-") and not (i and extra[i - 1].startswith("-")
                                                                                  and "=" not in extra[i - 1])]
        if stray:  # (a value right after an unknown flag is that flag's value)
            found.append(f"unexpected argument '{stray[0]}': every setting is a --flag VALUE pair")
        return found


def parse_dataclass(cls, argv, choices, prog, description, renamed=None):
    """An argparse parser built from a dataclass: --field per field, type from the annotation, help from
    the field's inline comment, choices from `choices`, one --help group per `# --- group` comment.
    Returns cls(**parsed)."""
    import inspect
    source = inspect.getsource(cls)
    helps, group_of, title, last, indent = {}, {}, None, None, 0
    for line in source.splitlines():  # a help may go on in comment lines indented deeper than its field
        field, more = re.match(r"(\s+)(\w+): \w+ = .+?  # (.+)$", line), re.match(r"(\s+)# (.+)$", line)
        if field:
            last, indent, helps[field[2]], group_of[field[2]] = field[2], len(field[1]), field[3], title
        elif more and last and len(more[1]) > indent:
            helps[last] += " " + more[2]
        else:
            last, title = None, (re.match(r"\s+# --- (.+)", line) or [None, title])[1]
    parser = FlagParser(prog, description, renamed)
    groups = {}
    for f in dataclasses.fields(cls):
        title = group_of.get(f.name) or "other"
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        kind = {"bool": bool, "int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        if kind is bool:
            group.add_argument(f"--{f.name}", action="store_true", help=helps[f.name])
        else:
            group.add_argument(f"--{f.name}", type=kind, default=f.default, help=helps[f.name],
                               choices=choices.get(f.name), metavar=None if f.name in choices else kind.__name__.upper())
    return cls(**vars(parser.parse_args(argv)))


def check_config(cfg, T=1000, alpha=None):
    """Reject settings that would crash deep inside a library or train silently wrong: every one of them in one
    line (all_or_die), each naming its flag and the fix. T: the schedule's number of timesteps, alpha its α_t (T,)
    (known once the model is loaded: a flow's α is 0 at its last timestep, σ = 1)."""
    problems = [f"--{f.name} {getattr(cfg, f.name)} is not a finite number" for f in dataclasses.fields(cfg)
                if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name))]
    need = lambda ok, message: ok or problems.append(message)
    for name in ("learning_rate", "fake_learning_rate"):
        need(getattr(cfg, name) > 0, f"--{name} {getattr(cfg, name)} must be > 0 (Diff-Instruct and DMD2 use 1e-5)")
    need(0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1,
         f"--adam_beta1/--adam_beta2 must be in [0, 1), got {cfg.adam_beta1}, {cfg.adam_beta2}")
    for name in ("max_grad_norm", "lora_rank", "checkpoints_total_limit"):
        need(getattr(cfg, name) >= 0, f"--{name} {getattr(cfg, name)} must be >= 0 (0 = off)")
    need(0 <= cfg.ema_decay < 1,
         f"--ema_decay {cfg.ema_decay} must be in [0, 1): 0 = off, 0.999 = a ~1000-step average")
    need(0 <= cfg.generator_timestep < T,
         f"--generator_timestep {cfg.generator_timestep} is outside the schedule; use 1..{T - 1} (0 = the family's)")
    need(0 <= cfg.t_min < cfg.t_max < T, f"need 0 <= --t_min < --t_max < {T}, got t_min={cfg.t_min} t_max={cfg.t_max}")
    if alpha is not None and 0 <= cfg.t_min < cfg.t_max < T:
        last = int((alpha > 0).nonzero().max())  # the noisiest timestep with α_t > 0
        need(cfg.t_max <= last, f"--t_max {cfg.t_max}: α_t = 0 there (the flow's pure noise, σ = 1), so the IKL's "
             f"w(t) = σ²/α² is infinite; use --t_max <= {last}")
    need(cfg.guidance_scale >= 1,
         f"--guidance_scale {cfg.guidance_scale} < 1 would push samples *away* from the prompt; use ω >= 1")
    for name in ("train_batch_size", "max_train_steps", "fake_steps_per_G", "checkpointing_steps", "validation_steps"):
        need(getattr(cfg, name) >= 1, f"--{name} must be a positive integer, got {getattr(cfg, name)}")
    need(cfg.reward_scale >= 0, f"--reward_scale {cfg.reward_scale} < 0 would minimise the reward; use α_rew >= 0")
    need(cfg.validation_diversity == 0 or cfg.validation_diversity >= 2, f"--validation_diversity "
         f"{cfg.validation_diversity}: diversity needs at least 2 images per prompt; use K >= 2, or 0 (off)")
    need(not (cfg.lora_rank and cfg.generator_init),
         "--lora_rank trains an adapter on the teacher and cannot start from --generator_init; drop one")
    # --shard fsdp with a switch it does not support yet is one more
    all_or_die(*(functools.partial(die, problem) for problem in problems), functools.partial(check_shard, cfg))


def files_stamp(*folders):
    """(name, size, mtime) of every file in these local folders ([] for a hub id): a key that changes when the
    files are rewritten, so a cache keyed by a model's path notices a model replaced in the same folder."""
    return [(os.path.join(f, n), os.path.getsize(os.path.join(f, n)), os.path.getmtime(os.path.join(f, n)))
            for f in folders if os.path.isdir(f) for n in sorted(os.listdir(f))]


def encoded_prompts(folder, key, prompts, make_encoder, device, main_rank=True, world=1, batch_size=32):
    """rows(batch of prompts) -> {name: (B, ...) tensor on device}: every prompt's text conditioning, read from
    folder/<hash>.safetensors when an earlier run (or rank 0) wrote it, else computed once in batches by
    make_encoder()(prompts) -> {name: tensor} and written there (atomically). The file is keyed by a hash of
    `key` (the model) and the prompts, so a changed prompt file or model never reads stale embeddings.
    make_encoder is called only on a miss and its encoder dropped on return: a 4.8 B-parameter T5 is loaded,
    used and freed before training starts, and a resumed run never loads it. Only rank 0 computes. The table is
    read row by row from the file, memory-mapped (~1 MB per prompt for T5-XXL in bf16: 30,000 COCO prompts are
    28 GiB on disk, not in RAM); a step copies its B rows to the device, at its top, when the previous step's work
    is already done."""
    import hashlib
    from safetensors import safe_open
    from safetensors.torch import save_file
    prompts = list(dict.fromkeys(prompts))
    digest = hashlib.sha256(json.dumps([key, prompts]).encode()).hexdigest()[:16]
    path = os.path.join(folder, f"{digest}.safetensors")
    if main_rank and not os.path.isfile(path):
        encode, table = make_encoder(), {}
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                for k, v in encode(prompts[i:i + batch_size]).items():  # filled in place: one copy in RAM
                    table.setdefault(k, torch.empty((len(prompts), *v.shape[1:]), dtype=v.dtype))[i:i + len(v)] = v
        del encode  # the text encoder goes with it
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        writable_dir(folder)
        write_files({path: lambda tmp: save_file(table, tmp, metadata={"key": json.dumps(key),
                                                                      "prompts": json.dumps(prompts)})})
    if world > 1:
        torch.distributed.barrier()  # the other ranks read what rank 0 wrote
    table, row = safe_open(path, framework="pt"), {p: i for i, p in enumerate(prompts)}  # (mmap; kept open)
    slices = {k: table.get_slice(k) for k in table.keys()}
    return lambda batch: {k: torch.cat([v[row[p]:row[p] + 1] for p in batch]).to(device) for k, v in slices.items()}


class PromptCache(dict):
    """prompt -> its text tensor, computed once and kept on the device. Prompts repeat, and tokenising on
    the CPU plus a host→device copy inside every reward call would cost a sync every step."""

    def batch(self, prompts, compute):
        new = [p for p in dict.fromkeys(prompts) if p not in self]
        if new:
            self.update(zip(new, compute(new)))
        return torch.stack([self[p] for p in prompts])

# -----------------------------------------------------------------------------
# 2. Devices and processes


def pick_device(name):
    """auto = cuda > mps > cpu. A named device that this machine does not have is one line, not a crash later."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            die(f"--device '{name}' is not a device name; use auto, cpu, cuda, cuda:N or mps")
        count = torch.cuda.device_count() if device.type == "cuda" else 0
        if device.type == "cuda" and (count == 0 or (device.index or 0) >= count):
            die(f"--device {name}: this machine has {count} CUDA device(s); use --device auto or cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            die(f"--device {name}: MPS is not available here; use --device auto or cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def precision(mixed_precision, device):
    """(autocast context, dtype of the frozen nets) for --mixed_precision. Trainable nets keep fp32 master
    weights; the readout layers run in fp32 (families.readout_in_fp32); the VAE stays fp32 under fp16."""
    if mixed_precision == "no":
        return contextlib.nullcontext(), torch.float32
    if mixed_precision == "fp16" and device.type != "cuda":
        die(f"--mixed_precision fp16 needs a CUDA GPU (device is {device}); use bf16 or no")
    dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype), dtype


def data_parallel(module, device, world):
    """module wrapped in DistributedDataParallel under torchrun (world > 1), else module itself."""
    if world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def check_shard(cfg):
    """--shard fsdp refuses, in one line, the switches it does not support (yet)."""
    for on, flag, why in ((cfg.lora_rank, "--lora_rank", "LoRA is the one-GPU mode (DDP, without --shard, runs it on "
                           "several)"), (cfg.ema_decay, "--ema_decay", "the EMA of sharded weights is not built yet"),
                          (cfg.compile != "none", "--compile", "the two were never tested together"),
                          (cfg.mixed_precision == "fp16", "--mixed_precision fp16", "each process would check only its "
                           "shard's gradients for fp16 overflow; use bf16")):
        if on and cfg.shard == "fsdp":
            die(f"{flag} cannot be combined with --shard fsdp: {why}")


def shard(net, units, readout, dtype):
    """(optional, --shard fsdp under torchrun) FSDP2 on a trainable denoiser, in place: `fully_shard` on every block
    whose class is named in `units` (a UNet's transformer and ResNet blocks, a DiT's transformer blocks), on the
    readout layer, then on net itself, which keeps what is left (embeddings, norms, in/out convolutions), as the
    PyTorch FSDP2 docs recommend. Each of N processes then holds 1/N of every weight, gradient and Adam state as a
    DTensor shard; a block's weights are all-gathered just before its forward and freed after it (again for the
    backward), and its gradients are reduce-scattered, averaged over ranks: each rank's update is the global
    batch's, as under DDP. Mixed precision keeps dipp's meaning: fp32 master shards; blocks gathered in `dtype`
    (the --mixed_precision one) to compute, gradients reduced in fp32; the readout gathered in fp32
    (families.readout_in_fp32 says why). Parameter names are unchanged, so checkpoints keep their keys."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    low = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    for block in [m for m in reversed(list(net.modules())) if type(m).__name__ in units]:  # (inner blocks first)
        fully_shard(block, mp_policy=low)
    fully_shard(getattr(net, readout), mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32,
                                                                      reduce_dtype=torch.float32))
    fully_shard(net, mp_policy=low)
    return net


def is_sharded(module):
    """Whether `module` was sharded by FSDP2 (shard): its parameters are then DTensor shards."""
    if not torch.distributed.is_available():  # (a torch built without it, as on some laptops, shards nothing)
        return False
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def init_distributed(cfg):
    """torchrun sets WORLD_SIZE / RANK / LOCAL_RANK: one process per GPU (NCCL), or per CPU process
    (gloo). Returns (rank, world_size, device). A plain `python dipp.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, pick_device(cfg.device)
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device not in ("auto", "cuda", "cpu"):  # torchrun decides the GPU: cuda:LOCAL_RANK
        die(f"--device {cfg.device} under torchrun: each process uses cuda:LOCAL_RANK; pass --device cuda "
            "(or auto, or cpu) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda under torchrun, but this machine has no CUDA device; use --device cpu (gloo)")
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, device

# -----------------------------------------------------------------------------
# 3. The optimizer step, trainable parameters, EMA


def die_non_finite(cfg, step, error):
    die(f"training stopped at step {step}: {error}. Last good checkpoint: {last_checkpoint(cfg.output_dir)}; "
        "lower --learning_rate or --reward_scale, or try bf16")


class SafeOptimizer:
    """A torch optimizer (AdamW in training) with what makes its step safe: fp16's loss scaler (disabled, a no-op,
    otherwise), --max_grad_norm clipping, and a stop on a non-finite loss before it can poison the weights.
    dipp.dipp_step calls zero_grad(), scaler.scale(loss).backward() and step(loss) itself, so every backward pass
    and every step of Alg. 1 stands in the iteration."""

    def __init__(self, params, optimizer, scaler, max_grad_norm=0.0):
        self.params, self.optimizer, self.scaler, self.max_grad_norm = params, optimizer, scaler, max_grad_norm
        self.loss_scale = 1.0  # the scale the last backward pass used (1 without fp16), for PullOnSample

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, loss):
        """After backward: stop on a non-finite loss (FloatingPointError, on every rank together), else unscale,
        clip and step. Returns whether GradScaler skipped the step because the fp16 gradients overflowed (it
        halves its scale exactly then)."""
        bad = (~torch.isfinite(loss.detach())).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad)  # every rank stops together, or the others hang in the next collective
        if loss.device.type != "meta" and bad.item():  # (a meta loss, cost.py's FLOP count, has no value to check)
            raise FloatingPointError(f"loss became {loss.item()} (on at least one rank)")
        self.loss_scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0  # .item() sync only under fp16
        self.scaler.unscale_(self.optimizer)  # clip the true gradient, not the fp16-scaled one
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # free the gradients now, as diffusers' training scripts do after their step: nothing reads them before the
        # next backward, and held through the other network's phase they cost its size again (SD1.5: 6.4 GiB,
        # docs/cost.md)
        self.optimizer.zero_grad(set_to_none=True)
        return self.scaler.is_enabled() and self.scaler.get_scale() < self.loss_scale


def cpu_adam(net, lr, betas=(0.0, 0.999)):
    """The toys' and notebooks' optimizer: torch's Adam on all of net's parameters (β1 = 0, as Diff-Instruct), with
    fp16's loss scaler off (a CPU) and no clipping, as a SafeOptimizer."""
    params = list(net.parameters())
    return SafeOptimizer(params, torch.optim.Adam(params, lr=lr, betas=betas), torch.amp.GradScaler("cpu", enabled=False))


class PullOnSample:
    """The gradient that backward delivers to a sample x0 (B, ...), minus a part known in closed form: for
    logging how hard the reward pulls next to the IKL (grad_reward next to grad_ikl) without a second
    backward pass. watch=False (no reward): nothing is hooked and the rest is 0."""

    def __init__(self, x0, known, watch=True):
        self.known, self.seen = known, []
        if watch:
            x0.register_hook(self.seen.append)  # ∂(scaled mean loss)/∂x0: (1/B)(known + rest) × loss scale

    def rest(self, loss_scale):
        """Per-sample ∂L/∂x0 minus the known part, (B, ...)."""
        if not self.seen:
            return torch.zeros_like(self.known)
        return self.seen[0].float() * (self.known.shape[0] / loss_scale) - self.known


def freeze(module, device, dtype):
    """eval mode, no weight gradients, on device in dtype (cast only when needed: .to(dtype) warns)."""
    module.to(device).eval().requires_grad_(False)
    return module if dtype == torch.float32 else module.to(dtype)


def trainable_named(module):
    """{name: parameter} of what training changes: the whole denoiser, or only its LoRA adapter."""
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


def make_adam(params, lr, betas, device):
    fused = device.type == "cuda"  # one kernel per step instead of one per tensor
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0, fused=fused)


def trainable(module):
    return list(trainable_named(module).values())


def ema_update(ema, params, decay):
    """(optional) θ_ema ← d·θ_ema + (1 − d)·θ for every trainable tensor, in one foreach kernel launch
    (not one per tensor: a UNet has ~700)."""
    torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)


@contextlib.contextmanager
def ema_weights(params, ema):
    """(optional) Inside the block the generator holds its EMA weights (a pointer swap, no copy), which
    sample grids and the export use when --ema_decay > 0. ema=None leaves the weights alone."""
    def swap():
        for p, e in zip(params, ema or []):
            p.data, e.data = e.data, p.data
    swap()
    try:
        yield
    finally:
        swap()

# -----------------------------------------------------------------------------
# 4. Memory and speed switches: LoRA on one shared base, checkpointed reward towers, torch.compile


def lora_copy(base, rank, name, targets):
    """(optional, --lora_rank) A denoiser that *shares* base's frozen weights (deepcopy with a memo mapping every
    base parameter to itself) plus one trainable rank-R LoRA adapter on the layers named in `targets`. Teacher,
    generator and fake score then cost one base network; the teacher is the base itself. LoRA's B starts at 0,
    so the copy starts = teacher. PEFT injects the adapter directly (what diffusers' add_adapter does for a
    UNet), so the same code serves PixArt's transformer, which has no add_adapter."""
    import copy
    from peft import LoraConfig, inject_adapter_in_model
    unet = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)), unet, adapter_name=name)
    for p in unet.parameters():
        if p.requires_grad:  # PEFT gives the adapter the base's (low) dtype; train it in fp32
            p.data = p.data.float()
    return unet


def autocast_off(x):
    """A context in which x's device runs without autocast. The meta device (cost.py counts FLOPs there) has no
    autocast to turn off."""
    return contextlib.nullcontext() if x.device.type == "meta" else torch.autocast(x.device.type, enabled=False)


class Fp32Conv2d(torch.nn.Conv2d):
    """A Conv2d computed in fp32 even under bf16/fp16 autocast (dipp's readout_in_fp32 says why)."""

    def forward(self, x):
        with autocast_off(x):
            return self._conv_forward(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


class Fp32Linear(torch.nn.Linear):
    """The same for a Linear (PixArt's proj_out: patch² × 8 channels, of which the ε half matters)."""

    def forward(self, x):
        with autocast_off(x):
            return torch.nn.functional.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


def fp32_layer(layer):
    """Compute this Conv2d or Linear in fp32 from now on: same parameters and state_dict keys; copies keep it."""
    layer.__class__ = Fp32Conv2d if isinstance(layer, torch.nn.Conv2d) else Fp32Linear
    return layer


def load_tiny_decoder(name, device, dtype, gradient_checkpointing=False):
    """(--reward_decoder tiny) TAESD, an AutoencoderTiny from a hub id or folder, frozen: the decoder the reward sees."""
    from diffusers import AutoencoderTiny
    taesd = load_or_die(lambda: AutoencoderTiny.from_pretrained(name), name, "the --reward_decoder tiny weights (TAESD)")
    if gradient_checkpointing:
        taesd.enable_gradient_checkpointing()
    return freeze(taesd, device, dtype)


def checkpoint_blocks(blocks):
    """Gradient checkpointing for a frozen reward tower: each block's activations are recomputed in the
    backward pass instead of stored (BLIP's ViT has no switch; transformers' only acts in train mode)."""
    from torch.utils.checkpoint import checkpoint
    for block in blocks:
        block.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(block.forward)


COMPILE_BACKEND = "inductor"  # the tests swap in "aot_eager": the same graph capture without the C++ build


def compile_nets(cfg, nets, device):
    """(optional, --compile MODE) torch.compile each network in place. Module.compile() keeps parameter
    names, so checkpoints, EMA, resume and export are unaffected, and the math is the same ops, fused.
    The first iterations compile (each net once per grad mode and batch shape; minutes for SD1.5)."""
    import torch._dynamo
    compilers = [os.environ.get("CXX"), "g++", "clang++"]  # what inductor's CPU code generation calls
    if device.type == "cpu" and COMPILE_BACKEND == "inductor" and not any(c and shutil.which(c) for c in compilers):
        die("--compile on a CPU needs a C++ compiler (g++ or clang++, or $CXX); install one or drop --compile")
    # teacher, generator and fake score share one UNet forward; give its graphs room before eager fallback
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for net in nets:
        net.compile(backend=COMPILE_BACKEND, mode=cfg.compile)

# -----------------------------------------------------------------------------
# 5. Checkpoints: checkpoint-N/{generator,fake_score[,generator_ema]}.safetensors + state.pt + dipp.json


def record_config(cfg, main_rank, writes, note):
    """The resolved config saved as config.json (a real run), and one line pointing to it with the settings that
    differ from the defaults: a newcomer's terminal shows progress, not fifty settings. --verbose also prints every
    key=value (getattr: a Config without the field gets the short form)."""
    settings = dataclasses.asdict(cfg)
    path = os.path.join(cfg.output_dir, "config.json")
    if writes:
        with open(path, "w") as f:
            json.dump(settings, f, indent=1)
    if not main_rank:
        return
    if getattr(cfg, "verbose", False):
        print("\n".join(f"{k}={v}" for k, v in settings.items()))
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    changed = " ".join(f"{k}={v}" for k, v in settings.items() if v != defaults.get(k) and k != "verbose")
    where = f"all {len(settings)} in {path}" if writes else "not saved: --benchmark writes no files"
    print(f"settings ({where}; --verbose prints them): {changed or 'the defaults'} {note}")


def prepare_output_dir(cfg, main_rank):
    """Create output_dir (one line if it cannot be written) and keep runs apart. A fresh run into a folder
    holding another run's checkpoints or log.jsonl stops: its keep-last-K policy could delete its own
    newest checkpoint, `latest` would name the old run's, and the log would mix both. Resuming continues
    that run; --overwrite_output_dir deletes it first (as diffusers' scripts do with that flag)."""
    if main_rank:
        writable_dir(cfg.output_dir)
    log = os.path.join(cfg.output_dir, "log.jsonl")
    old = list_checkpoints(cfg.output_dir) + ([log] if os.path.isfile(log) else [])
    if cfg.resume_from_checkpoint or not old:
        return
    if not cfg.overwrite_output_dir:
        die(f"--output_dir '{cfg.output_dir}' holds another run ({', '.join(map(os.path.basename, old))}); "
            "continue it with --resume_from_checkpoint latest, choose a new --output_dir, or pass "
            "--overwrite_output_dir to delete that run first")
    if main_rank:
        gone = old + [os.path.join(cfg.output_dir, f) for f in os.listdir(cfg.output_dir)
                      if re.fullmatch(r"samples_\d+\.png|generator|checkpoint-\d+\.(tmp|old)", f)]
        for path in gone:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        print(f"--overwrite_output_dir: deleted {len(gone)} files/folders of the previous run in {cfg.output_dir}")


RUN_FILES = (r"config\.json|log\.jsonl|curves\.png|samples_\d+\.png|generated_\d+\.png|tensorboard|wandb|checkpoint-\d+\.tmp"
             r"|text_embeddings")


def trained_a_step(folder):
    """Whether a run in `folder` got past its first step: a checkpoint, or a log line of step >= 1."""
    log = os.path.join(folder, "log.jsonl")
    steps = [json.loads(line).get("step", 0) for line in open(log) if line.strip()] if os.path.isfile(log) else []
    return bool(list_checkpoints(folder)) or any(s >= 1 for s in steps)


@contextlib.contextmanager
def tidy_if_stopped_early(folder, main_rank=True, progress=trained_a_step, run_files=RUN_FILES):
    """A run into a fresh --output_dir that stops before its first step (a missing model, a wrong flag found
    late, out of memory in step 1) takes its own files with it: config.json, the step-0 log and grid, and the
    folder itself when nothing else is left. Otherwise the next try would find an empty folder, or one that
    'holds another run'. The prompts' text_embeddings/ go too (the retry encodes them again: main() promises a
    fresh folder left as it was); --random_weights models stay (a cache the retry reuses, not this run's).
    A folder that already held a run is left as it is. (evaluate.py passes its own progress and run_files.)"""
    before = set(os.listdir(folder)) if os.path.isdir(folder) else None
    fresh = before is None or not (list_checkpoints(folder) or "log.jsonl" in before)
    try:
        yield
    except BaseException:
        if main_rank and fresh and os.path.isdir(folder) and not progress(folder):
            for name in set(os.listdir(folder)) - (before or set()):
                path = os.path.join(folder, name)
                if re.fullmatch(run_files, name):
                    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            if before is None and not os.listdir(folder):
                os.rmdir(folder)
        raise


def rng_states(device, world):
    """Every rank's RNG state (CPU, and its own GPU's), gathered to all ranks: a collective, so every rank
    calls it. On resume rank r restores entry r, so no rank replays an un-advanced stream."""
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if world == 1:
        return [mine]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def save_checkpoint(cfg, step, nets, t_star, states, ema=None, rng=None, write=True):
    """Write checkpoint-N atomically (to a .tmp folder, then rename): a kill or a full disk mid-save never
    leaves a half-written checkpoint-N, and the .tmp folder is removed. Keeps the newest
    cfg.checkpoints_total_limit. nets: {"generator": module, "fake_score": module}, of which the trainable
    tensors are saved (full networks, or only their LoRA adapters); ema: the generator's EMA tensors;
    t_star: the generator's t*, for dipp.json; states: {name: object with state_dict()} (optimisers, loss
    scalers); rng: rng_states(), one entry per rank. write: whether this process writes (rank 0). Sharded nets
    (--shard fsdp) are saved whole, in the layout one process writes, so any number of processes resumes them:
    gathering them is a collective, so then every rank calls this."""
    sharded = any(is_sharded(net) for net in nets.values())
    if not (write or sharded):
        return
    weights = {name: full_weights(net) for name, net in nets.items()}  # (sharded: collectives, whole on rank 0)
    saved = {k: full_optimizer_state(v, owner(v, nets)) if owner(v, nets) else v.state_dict()
             for k, v in states.items()}
    if not write:
        return
    final = os.path.join(cfg.output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    from safetensors.torch import save_file
    try:
        os.makedirs(tmp)
        if ema is not None:
            weights["generator_ema"] = dict(zip(weights["generator"], ema))
        for name, tensors in weights.items():
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, os.path.join(tmp, f"{name}.safetensors"))
        torch.save({"step": step, "rng": rng, **saved}, os.path.join(tmp, "state.pt"))
        write_generator_record(tmp, t_star)
    except BaseException as e:  # a full disk, a kill: drop the partial folder, keep every older checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure(e)
        if reason is None:
            raise
        die(f"could not write {final} ({reason}); the partial folder was removed. Last good "
            f"checkpoint: {last_checkpoint(cfg.output_dir)}; free space and resume with --resume_from_checkpoint latest")
    if os.path.isdir(final):  # resuming from an earlier step into the same output_dir: swap the old one out
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)
    if cfg.checkpoints_total_limit > 0:
        for old in list_checkpoints(cfg.output_dir)[:-cfg.checkpoints_total_limit]:
            shutil.rmtree(old)


FULL_STATE = dict(full_state_dict=True, cpu_offload=True)  # torch.distributed.checkpoint: whole tensors on rank 0's CPU


def full_weights(net, trained_only=True):
    """{name: tensor} of net's trainable tensors (or its whole state dict), whole. For a sharded net a collective
    that every rank calls: get_model_state_dict gathers the shards onto rank 0's CPU; the other ranks get {}."""
    if not is_sharded(net):
        return {k: p.detach() for k, p in trainable_named(net).items()} if trained_only else net.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(net, options=StateDictOptions(**FULL_STATE))
    return {k: full[k] for k in trainable_named(net) if k in full} if trained_only else full


def owner(opt, nets):
    """The sharded net among nets.values() whose parameters the optimiser `opt` steps; None for an unsharded one
    (or a loss scaler)."""
    first = next((p for g in getattr(opt, "param_groups", []) for p in g["params"]), None)
    for net in nets.values():
        if is_sharded(net):  # after a no-grad forward FSDP2 leaves the root's weights gathered, in place of the
            net.reshard()    # shards the optimiser steps: shard them again, so parameters() lists the optimiser's
            if any(p is first for p in net.parameters()):
                return net
    return None


def full_optimizer_state(opt, net):
    """For the optimiser of a sharded net: opt.state_dict() as one process writes it (parameters numbered 0..n−1 in
    the optimiser's order, whole moments), gathered onto rank 0 (a collective; the other ranks get {}).
    get_optimizer_state_dict names the parameters instead; numbering them keeps the unsharded layout."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    named = get_optimizer_state_dict(net, opt, options=StateDictOptions(**FULL_STATE))
    if not named:
        return {}
    index = {n: i for i, n in enumerate(n for g in named["param_groups"] for n in g["params"])}
    return {"state": {index[n]: v for n, v in named["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]}


def load_full_optimizer_state(opt, net, state):
    """The inverse of full_optimizer_state: an optimiser state of the unsharded layout (written by one process or
    by N) loaded into the optimiser of a sharded net; each rank keeps its shards of the moments."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = {id(p): n for n, p in net.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]  # number i -> parameter name
    named = {"state": {order[i]: v for i, v in state["state"].items()},
             "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(net, opt, named, options=StateDictOptions(full_state_dict=True))
    for group, saved in zip(opt.param_groups, state["param_groups"]):  # DCP turned tuples (Adam's betas) into lists:
        group.update({k: v for k, v in saved.items() if k != "params"})  # keep the saved values, as load_state_dict


def write_failure(error):
    """Why a file write failed (full disk, quota, file-size limit), or None when `error` is something else. Each
    writer says it its own way: open() and PIL raise OSError; safetensors a SafetensorError "I/O error: ... (os
    error 28)"; torch.save's zip writer a RuntimeError that names no cause at all (measured under RLIMIT_FSIZE:
    "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, OSError):
        return error.strerror or text or type(error).__name__
    if type(error).__name__ == "SafetensorError" and "I/O error" in text:
        return text[text.index("I/O error"):]
    if isinstance(error, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        return f"torch.save could not write the file, most likely a full disk: {text[:120]}"
    return None


def write_files(writers):
    """writers: {path: write(tmp_path)}. Every file is first written to path.tmp, and only when all are written
    are they renamed into place (a rename needs no space): the paths hold all the new files or none of them,
    never a half-written one. A write that fails (full disk, quota, file-size limit) removes every .tmp and
    ends in one line; any other error is raised as it is, also after removing them."""
    tmps = {path: f"{path}.tmp" for path in writers}
    try:
        for path, write in writers.items():
            write(tmps[path])
    except BaseException as e:
        for tmp in tmps.values():
            with contextlib.suppress(OSError):
                os.remove(tmp)
        reason = write_failure(e)
        if reason is None:
            raise
        die(f"could not write '{path}' ({reason}); nothing half-written was left. Free space, or choose "
            "another --output_dir, and run again")
    for path, tmp in tmps.items():
        os.replace(tmp, path)


def list_checkpoints(output_dir):
    found = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)] if os.path.isdir(output_dir) else []
    return [os.path.join(output_dir, d) for d in sorted(found, key=lambda d: int(d.split("-")[1]))]


def last_checkpoint(output_dir):
    """The newest checkpoint-N folder, named in the one-line errors of a run that stops ('none' if there is none)."""
    kept = list_checkpoints(output_dir)
    return kept[-1] if kept else "none"


def load_checkpoint(cfg, nets, states, ema=None, rank=0, world=1, device=torch.device("cpu")):
    """Restore the weights of nets ({name: module}, as saved), the generator's EMA, optimiser and loss-scaler states, this rank's RNG and the step from
    --resume_from_checkpoint. Returns the step. state.pt loads with weights_only=True: a checkpoint someone
    sends you cannot run code on load. A truncated or corrupted file is one line, not a traceback."""
    from safetensors.torch import load_file
    path = cfg.resume_from_checkpoint
    if path == "latest":
        found = list_checkpoints(cfg.output_dir)
        if not found:
            die(f"--resume_from_checkpoint latest: no checkpoint-N folder in {cfg.output_dir}")
        path = found[-1]
    if not os.path.isfile(os.path.join(path, "state.pt")):
        die(f"--resume_from_checkpoint '{path}' is not a dipp checkpoint folder (no state.pt)")

    def read(file, loader):
        try:
            return loader(os.path.join(path, file))
        except Exception as e:  # safetensors' and pickle's many ways of saying "truncated" or "not this format"
            die(f"checkpoint '{path}' is damaged: {file} cannot be read ({type(e).__name__}: {str(e)[:120]}); "
                "resume from an older checkpoint-N folder")
    for name, net in nets.items():
        weights = read(f"{name}.safetensors", load_file)
        expected = {k: p.shape for k, p in trainable_named(net).items()}
        if {k: v.shape for k, v in weights.items()} != expected:
            die(f"checkpoint '{path}' does not match this model ({name}: {len(weights)} tensors saved, "
                f"{len(expected)} trainable here); resume with the --lora_rank it was trained with")
        if is_sharded(net):  # every rank read the whole tensors; each keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(net, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            net.load_state_dict(weights, strict=False)
    if ema is not None:
        if not os.path.isfile(os.path.join(path, "generator_ema.safetensors")):
            die(f"checkpoint '{path}' has no EMA weights; resume without --ema_decay or from an EMA run")
        saved = read("generator_ema.safetensors", load_file)
        for k, e in zip(trainable_named(nets["generator"]), ema):
            e.copy_(saved[k])
    state = read("state.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
    for name, obj in states.items():
        if name in state:  # (checkpoints written before the loss scalers were saved lack scaler_*)
            sharded = owner(obj, nets)
            load_full_optimizer_state(obj, sharded, state[name]) if sharded else obj.load_state_dict(state[name])
    rng = state["rng"] if isinstance(state["rng"], list) else [{"cpu": state["rng"]["cpu"], "cuda": None}]
    if len(rng) != world:
        print(f"note: {path} was written by {len(rng)} process(es) and is resumed by {world}: the weights and Adam "
              "states continue; the same run continues only with the same global batch (processes × "
              "--train_batch_size), then up to float rounding")
    mine = rng[min(rank, len(rng) - 1)]
    torch.set_rng_state(mine["cpu"])
    if mine["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], device)
    print(f"resumed from {path} at step {state['step']}")
    return state["step"]

# -----------------------------------------------------------------------------
# 6. Logging, curves, signals


class RunLog:
    """log.jsonl (one JSON line per step, plus validation entries) and, optionally, TensorBoard or wandb.
    On resume, lines after the checkpoint's step are dropped: they belong to steps that are re-run."""

    def __init__(self, cfg, step):
        self.path = os.path.join(cfg.output_dir, "log.jsonl")
        if step and os.path.isfile(self.path):
            keep = [line for line in open(self.path) if json.loads(line).get("step", 0) <= step]
            open(self.path, "w").writelines(keep)
        self.file, self.report = open(self.path, "a"), None
        if cfg.report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                die("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
            writer = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))
            self.report = lambda stats, step: [writer.add_scalar(k, v, step) for k, v in stats.items()]
        elif cfg.report_to == "wandb":
            try:
                import wandb
            except ImportError:
                die("--report_to wandb needs the wandb package: pip install wandb (then wandb login)")
            wandb.init(project="dipp", dir=cfg.output_dir, config=vars(cfg), resume="allow")
            self.report = lambda stats, step: wandb.log(stats, step=step)

    def write(self, stats):
        self.file.write(json.dumps(stats) + "\n")
        self.file.flush()
        if self.report:
            self.report({k: v for k, v in stats.items() if k != "step"}, stats["step"])

    def close(self):
        self.file.close()
        plot_curves(self.path, os.path.join(os.path.dirname(self.path), "curves.png"))


def plot_curves(log_path, png_path):
    """The run at a glance from log.jsonl: both losses, training and held-out reward (± its spread), the
    gradient sizes at x0 (a mix's per-term pulls too) and, when the run watched other rewards or trained on a
    mix, every held-out reward's change side by side: a reward that rises while the others fall is the reward
    being hacked. `python plumbing.py curves runs/x/log.jsonl` redraws it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(log_path)]
    def series(key):  # (steps, values) of the rows that have a number for key (None and nan skipped)
        pairs = [(r["step"], r[key]) for r in rows if r.get(key) is not None and r[key] == r[key]]
        return [s for s, _ in pairs], [v for _, v in pairs]
    # every reward scored on the held-out prompts: the trained one (val_reward), a mix's terms, the watched ones
    watched = sorted({k for r in rows for k in r if k.startswith("val_") and not k.endswith("_std")} - {"val_reward"})
    terms = sorted({k for r in rows for k in r if k.startswith("grad_reward_")})  # a mix's per-term pulls
    fig, axes = plt.subplots(1, 5 if watched else 4, figsize=(22 if watched else 18, 3.6))
    for ax, keys, title in ((axes[0], ["loss_fake"], "fake-score DSM loss"), (axes[1], ["loss_ikl"], "IKL surrogate (value means nothing)"),
                            (axes[2], ["reward", "val_reward"], "reward: training prompts / held-out"),
                            (axes[3], ["grad_ikl", "grad_reward"] + terms, "RMS ∂L/∂x0 per sample")):
        for key in keys:
            ax.plot(*series(key), "o-" if key == "val_reward" else "-", label=key, ms=3)
        if "val_reward" in keys and series("val_reward_std")[0]:
            steps, mean, std = *series("val_reward"), dict(zip(*series("val_reward_std")))
            ax.fill_between(steps, [m - std.get(s, 0) for s, m in zip(steps, mean)],
                            [m + std.get(s, 0) for s, m in zip(steps, mean)], alpha=0.2)
        if "grad_ikl" in keys and series("grad_ikl")[0]:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    if watched:  # on one axis: each one's change since its first value, in units of its spread over the prompts
        ax = axes[4]
        for key in ["val_reward"] + watched:
            steps, values = series(key)
            if not steps:
                continue
            spread = dict(zip(*series(key + "_std"))).get(steps[0]) or 1.0
            trained = key == "val_reward" or f"grad_reward_{key[4:]}" in terms  # (a mix's terms log their pulls)
            ax.plot(steps, [(v - values[0]) / spread for v in values], "o-" if trained else "o--", ms=3,
                    label=key + ("" if trained else " (watched)"), lw=2.5 if key == "val_reward" else 1)
        ax.axhline(0, color="grey", lw=0.5)
        what = "held-out rewards" + (" and diversity" if "val_diversity" in watched else "")
        ax.set_title(f"{what}: Δ since the first validation / spread", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return png_path


def global_means(values, signal, world):
    """{name: scalar tensor} -> ({name: float}, stop): the means over all ranks (so the log shows the global
    batch, not rank 0's share) and whether a signal reached any rank (then every rank stops at this step).
    One all-reduce and one .tolist(): the only place a step waits for its queued GPU work."""
    stacked = torch.stack([v.float() for v in values.values()] + [next(iter(values.values())).new_tensor(float(signal > 0))])
    if world > 1:
        torch.distributed.all_reduce(stacked)
        stacked /= world
    *means, stop = stacked.tolist()
    return dict(zip(values, means)), stop > 0


@torch.no_grad()
def held_out_reward(sample, reward, prompts, z, batch_size, contexts, grid_path, watch=None, diversity=None,
                    z_div=None):
    """The generator on held-out prompts with fixed noise: images = sample(z_i, c_i) in batches (inside
    `contexts`: autocast, EMA weights), a grid of the first four at grid_path, and the reward's mean and
    population std over all prompts. The same z_i every time, so the curve shows the generator's change
    rather than sampling noise. Also val_<name> (mean and std) of each term of a mixed reward (its .last
    scores) and of each reward in `watch` ({name: reward fn}: rewards the run is *not* trained on), and
    val_diversity with `diversity` (rewards.Diversity: K images per prompt from the fixed noises z_div, (P·K, ...))."""
    images, scores = [], {}
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            images.append(sample(z[i:i + len(batch)], batch))
            if reward is not None:
                scores.setdefault("reward", []).append(reward(images[-1], batch).float())
                if len(getattr(reward, "last", {})) > 1:  # a mix: each term's own score
                    for name, r in reward.last.items():
                        scores.setdefault(name, []).append(r.float())
            for name, fn in (watch or {}).items():
                scores.setdefault(name, []).append(fn(images[-1], batch).float())
        if diversity is not None:  # K more images of each prompt, embedded batch by batch (K consecutive per prompt)
            repeated = [p for p in prompts for _ in range(diversity.images_per_prompt)]
            embeddings = [diversity.embed(sample(z_div[i:i + batch_size], repeated[i:i + batch_size])).float()
                          for i in range(0, len(repeated), batch_size)]
            scores["diversity"] = [diversity(torch.cat(embeddings))]  # (P,)
    if grid_path:  # (None: a rank other than 0 that runs it only because the sharded generator needs every rank)
        save_grid(torch.cat(images)[:4], prompts[:4], grid_path)
    out = {}
    for name, values in scores.items():
        r = torch.cat(values)  # (P,)
        out.update({f"val_{name}": r.mean().item(), f"val_{name}_std": r.std(unbiased=False).item()})
    return out


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (a cluster's pre-emption) set .requested instead of killing the run:
    the loop finishes its step, writes a checkpoint and exits. A second Ctrl-C interrupts at once."""

    def __enter__(self):
        import signal
        import threading
        self.requested, self.old = 0, {}
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested and signum == 2:  # SIGINT twice: the user insists
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\nsignal {signum}: finishing this step, then writing a checkpoint (Ctrl-C again to abort)", flush=True)

    def exit(self, cfg, step, log=None):
        """After the interrupted step's checkpoint: say how to resume (rank 0, which has the log), then exit."""
        if log is not None:
            print(f"stopped by signal {self.requested or 'on another rank'} after step {step}; "
                  f"{os.path.join(cfg.output_dir, f'checkpoint-{step}')} is written. To continue, run the "
                  "same command with --resume_from_checkpoint latest", file=sys.stderr)
            log.close()
        raise SystemExit(130 if self.requested in (0, 2) else 128 + self.requested)

    def __exit__(self, *exc):
        import signal
        for sig, old in self.old.items():
            signal.signal(sig, old)


# (optional) Programs that start programs: one run per folder, and a kill reaches the whole job. dipp.py keeps
# its runs apart by what a folder holds (prepare_output_dir); reproduce.py and evaluate.py also hold a lock.


@contextlib.contextmanager
def folder_lock(path, flag="--output_dir"):
    """Two runs never write one folder at once: an exclusive flock on the folder itself (no lock file to leave
    behind), held for the block and released by the kernel when the process ends, however it ends (kill -9
    included). While another process holds it, this run stops in one line. Yields the lock's file descriptor:
    reproduce.py hands it to the runs it starts, so that one left running still holds the folder."""
    import fcntl
    writable_dir(path, flag)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        die(f"{flag} '{path}' is in use by another run that is still going (it holds the folder's lock); let it "
            f"finish or stop it, or choose another {flag}")
    try:
        yield fd
    finally:
        os.close(fd)


def die_with_parent():
    """(Linux, in a child before it runs) SIGTERM to this process when its parent dies, even of kill -9, which
    no handler sees: a child is never left training alone. PR_SET_PDEATHSIG = 1 in <linux/prctl.h>."""
    import ctypes
    import signal
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(143)


def run_child(command, cwd=None, pass_fds=()):
    """Run command and wait for it; returns (exit code, the signal this process received meanwhile or None).
    SIGINT and SIGTERM sent to this process are passed on to the child, each time, and it is waited for: a
    Ctrl-C or a scheduler's kill stops the whole job, and a dipp.py child first writes its checkpoint. The child
    has its own process group, so a terminal's Ctrl-C (sent to the whole foreground group) reaches it once,
    through here, not twice (a second Ctrl-C makes dipp.py stop without a checkpoint)."""
    import signal
    import subprocess
    received, child = [], []

    def forward(signum, frame):
        received.append(signum)
        for process in child:  # (none yet while it starts: passed on right after)
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)
    import threading
    main = threading.current_thread() is threading.main_thread()  # (signals can only be caught there)
    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        child.append(subprocess.Popen(command, cwd=cwd, pass_fds=tuple(pass_fds), start_new_session=True,
                                      preexec_fn=die_with_parent if sys.platform.startswith("linux") else None))
        if received:  # a signal that came while the child was being started
            child[0].send_signal(received[-1])
        code = child[0].wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return code, (received[0] if received else None)


def ignore_sigint():
    """(a pool's worker) A terminal's Ctrl-C goes to every process of the foreground group: the workers leave it
    to their parent, which ends them (run_in_processes), instead of each printing a traceback."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_in_processes(fn, jobs, workers):
    """{name: arguments} -> {name: fn(*arguments)}, over `workers` spawned processes. If this process is stopped
    (Ctrl-C, or SIGTERM under stopped_in_one_line) or a job fails, the workers are ended at once, not left to
    finish their runs: a kill stops the whole job."""
    import concurrent.futures
    import multiprocessing
    pool = concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                                                  initializer=ignore_sigint)
    try:
        futures = {k: pool.submit(fn, *v) for k, v in jobs.items()}
        from tqdm import tqdm
        with tqdm(total=len(futures), desc="runs", unit="run") as bar:  # (a full toy runs for minutes)
            for future in concurrent.futures.as_completed(futures.values()):
                future.result()  # (a failed job stops the rest at once)
                bar.update()
        results = {k: f.result() for k, f in futures.items()}
    except BaseException:
        processes = list((getattr(pool, "_processes", None) or {}).values())  # (Python < 3.14: no public way)
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            with contextlib.suppress(Exception):
                process.terminate()
        for process in processes:
            process.join(10)
        raise
    pool.shutdown()
    return results


def given_flags(argv):
    """The --flag names typed on the command line (argv; None: sys.argv), so that a preset such as --quick fills
    only the others: what the user typed wins."""
    argv = sys.argv[1:] if argv is None else argv
    return {a[2:].split("=")[0] for a in argv if a.startswith("--")}


def apply_preset(args, preset, argv):
    """args.<k> = v for each (k, v) of preset whose flag was not given explicitly in argv."""
    given = given_flags(argv)
    for k, v in preset.items():
        if k not in given:
            setattr(args, k, v)


def check_ranges(parser, args, rules):
    """rules: {flag name: (test, what it must be)}; every value that fails is named, with its flag, in one line."""
    bad = []
    for name, (ok, must) in rules.items():
        value = getattr(args, name)
        if not all(ok(v) for v in (value if isinstance(value, list) else [value])):
            bad.append(f"--{name} {value if not isinstance(value, list) else ' '.join(map(str, value))}: "
                       f"must be {must}")
    if bad:
        parser.error(bad[0] if len(bad) == 1 else f"{len(bad)} problems: " + "; ".join(bad))


@contextlib.contextmanager
def stopped_in_one_line(how_to_resume):
    """SIGTERM (a scheduler, `timeout`) and SIGINT end this process with exit code 143 / 130 and one line saying
    how to continue, instead of a traceback or a silent exit."""
    import signal
    import threading

    def stop(signum, frame):
        raise KeyboardInterrupt(signum)
    if threading.current_thread() is not threading.main_thread():  # (signals can only be caught there)
        yield
        return
    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args else signal.SIGINT
        print(f"{PROGRAM}: stopped by signal {signum}; {how_to_resume}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    finally:
        signal.signal(signal.SIGTERM, old)

# -----------------------------------------------------------------------------
# 7. What a run leaves behind: the exported generator (dipp.json with its teacher, the LoRA adapter file, the
#    model card), sample grids, the benchmark line


def merged_lora(net, copy=True):
    """A LoRA-carrying network with each adapter merged into its layer, W ← W + (α/r)·B·A, and the PEFT wrappers
    replaced by the plain layers: the same function as a plain diffusers model, no PEFT needed. copy: merge into a
    fp32 copy (training's generator shares its base weights with the teacher, which merging would overwrite)."""
    import copy as copying
    from peft.tuners.tuners_utils import BaseTunerLayer
    net = copying.deepcopy(net).to(torch.float32) if copy else net
    for name, layer in [(n, m) for n, m in net.named_modules() if isinstance(m, BaseTunerLayer)]:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent), child, layer.get_base_layer())
    return net


def export_generator(net, t_star, folder, write=True, cfg=None, family=None):
    """The trained generator's denoiser as a plain diffusers model folder (a UNet, or PixArt's transformer), with
    dipp.json (t*, and with cfg and family: the teacher and the training settings) and a model card (README.md).
    A LoRA one is merged into (a copy of) its base, so any diffusers pipeline loads it, and (given its family) also
    written as the adapter file a stock pipeline's load_lora_weights reads (save_lora_adapter). write: whether
    this process writes (rank 0); a sharded one (--shard fsdp) is gathered whole into an unsharded model first, a
    collective, so then every rank calls this."""
    if is_sharded(net):
        from torch.distributed.fsdp import FSDPModule
        weights = full_weights(net, trained_only=False)  # (whole on rank 0, {} elsewhere)
        if not write:
            return
        plain = next(c for c in type(net).__mro__ if not issubclass(c, FSDPModule))  # the class fully_shard subclassed
        with torch.device("meta"):  # no memory, no random init: every tensor comes from `weights`
            net = plain.from_config(net.config)
        net.load_state_dict(weights, assign=True)
    if not write:
        return
    record = dict(generator_timestep=int(t_star))
    if cfg is not None:
        record.update(run_record(cfg, folder, family))
        os.makedirs(folder, exist_ok=True)
        grids = sorted((f for f in os.listdir(cfg.output_dir) if re.fullmatch(r"samples_\d+\.png", f)),
                       key=lambda f: int(f[8:-4]))
        if grids:  # the last validation grid, which the model card shows
            shutil.copy(os.path.join(cfg.output_dir, grids[-1]), folder)
    if any("lora_" in k for k in trainable_named(net)):  # this generator is a LoRA adapter on a shared base
        if family is not None:
            record["lora"] = save_lora_adapter(net, folder, family)
        net = merged_lora(net)
    net.save_pretrained(folder)
    write_generator_record(folder, **record)
    write_model_card(folder, record, family)
    print(f"generator saved to {folder}" + (f" (and its LoRA adapter, {LORA_FILE})" if record.get("lora") else ""))


GENERATOR_RECORD = "dipp.json"  # beside a generator's weights: {"generator_timestep": t*, "teacher": ..., ...}
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights writes (LORA_WEIGHT_NAME_SAFE)
PAPER = "Diff-Instruct++ (W. Luo, arXiv [2410.18881](https://arxiv.org/abs/2410.18881), TMLR 2025)"


def run_record(cfg, folder, family=None):
    """What dipp.json records about a run beside t*: the teacher (a hub id; or a folder, absolute and relative to
    the generator folder, so that a run folder moved whole still finds its own; or dipp's random-weight recipe,
    which rebuilds it), the family, the number of processes and the training settings (the whole Config)."""
    name = cfg.pretrained_model_name_or_path
    record = {"teacher": name}
    if os.path.isdir(name):
        path = os.path.abspath(name)
        record.update(teacher=path, teacher_relative=os.path.relpath(path, os.path.abspath(folder)))
    if cfg.random_weights:
        record["random_weights"] = {"shapes": cfg.random_weights, "seed": cfg.seed}
    if family is not None:
        record["family"] = family.name
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    record["training"] = {**dataclasses.asdict(cfg), "processes": world}
    return record


def write_generator_record(folder, generator_timestep, **more):
    """dipp.json: what a generator folder (or checkpoint) needs beyond its weights to sample as trained, and what it
    was trained from (run_record)."""
    with open(os.path.join(folder, GENERATOR_RECORD), "w") as f:
        json.dump({"generator_timestep": int(generator_timestep), **more}, f, indent=1)


def generator_record(path):
    """The dipp.json of a generator folder, or of the folder holding a generator's weight file (the LoRA adapter,
    or a bare state dict); {} where there is none (a generator not written by dipp)."""
    folder = os.path.dirname(path) if os.path.isfile(path) else path
    file = os.path.join(folder, GENERATOR_RECORD)
    if not os.path.isfile(file):
        return {}
    try:
        record = json.load(open(file))
        int(record["generator_timestep"])
        return record
    except (ValueError, KeyError, TypeError) as e:
        die(f"'{file}' is damaged ({type(e).__name__}: {e}); it should read {{\"generator_timestep\": t*, ...}}")


def read_generator_record(folder):
    """t* from dipp.json beside a generator (generator_record), or None where there is none."""
    record = generator_record(folder)
    return int(record["generator_timestep"]) if record else None


def use_recorded_teacher(cfg, argv=None, rebuild=None):
    """--generate with --generator_init but neither --pretrained_model_name_or_path nor --random_weights: the teacher
    is the one the generator's dipp.json records (recorded_teacher), not the default hub id. An explicit flag wins.
    rebuild: random_weights.build_random, for a random-weight teacher whose folder is gone."""
    argv = sys.argv[1:] if argv is None else argv
    flag = "--pretrained_model_name_or_path"
    given = any(a == flag or a.startswith(flag + "=") for a in argv)
    if cfg.generate and cfg.generator_init and not cfg.random_weights and not given:
        cfg.pretrained_model_name_or_path = (recorded_teacher(cfg.generator_init, cfg.output_dir, rebuild)
                                             or cfg.pretrained_model_name_or_path)


def recorded_teacher(generator, output_dir, rebuild=None):
    """The teacher that dipp.json beside `generator` names (None: no record, or one without a teacher): a hub id as
    written; a folder where it now is (relative to the generator first: a run folder moved whole); a random-weight
    teacher whose folder is gone rebuilt from its recipe by rebuild(folder, shapes, seed) in output_dir. A recorded
    folder that is gone is one line."""
    record = generator_record(generator)
    teacher = record.get("teacher")
    if not teacher or "teacher_relative" not in record:
        return teacher or None
    here = os.path.dirname(generator) if os.path.isfile(generator) else generator
    for folder in (os.path.join(here, record["teacher_relative"]), teacher):
        if os.path.isdir(folder):
            return os.path.normpath(folder)
    recipe = record.get("random_weights")
    if recipe and rebuild:  # the same shapes and seed build the same weights
        print(f"the teacher recorded in {generator}'s dipp.json ('{teacher}') is gone; rebuilding its random "
              f"weights (--random_weights {recipe['shapes']}, seed {recipe['seed']}) in {output_dir}")
        return rebuild(os.path.join(output_dir, recipe["shapes"]), recipe["shapes"], recipe["seed"])[0]
    die(f"the teacher of '{generator}', recorded in its {GENERATOR_RECORD} as the folder '{teacher}', no longer "
        "exists; pass --pretrained_model_name_or_path with that folder's new place (or the hub id it came from)")


def save_lora_adapter(net, folder, family):
    """Write net's LoRA adapter as folder/pytorch_lora_weights.safetensors through the family's stock pipeline class's
    save_lora_weights (diffusers' LoRA training scripts' route), so that `pipe.load_lora_weights(folder)` applies it.
    Returns {"file", "rank", "alpha", "layers"} for dipp.json, or None (one line) where that pipeline has no LoRA
    loader. One departure from the training scripts: PEFT's own keys (lora_A/lora_B) are saved, as diffusers'
    save_lora_adapter saves them, not passed through convert_state_dict_to_diffusers: that renames only the attention
    layers' keys (to_q.lora.down), and diffusers 0.39's loader, deciding the format from the first key (a conv's
    lora_A), then silently drops every attention adapter. The adapter's LoraConfig goes into the file's metadata,
    so the loader applies the trained scale α/r (test_export.py checks both)."""
    import diffusers
    from peft.utils import get_peft_model_state_dict
    pipeline = getattr(diffusers, family.pipeline)
    if not hasattr(pipeline, "load_lora_weights"):
        print(f"no LoRA adapter file: diffusers {diffusers.__version__}'s {family.pipeline} cannot load one (it has no "
              "load_lora_weights); the generator is exported merged only")
        return None
    name = next(iter(net.peft_config))  # the one adapter G carries ("generator"; the fake score's is on its own copy)
    config = net.peft_config[name]
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    weights = {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(net, adapter_name=name).items()}
    pipeline.save_lora_weights(folder, **{f"{family.folder}_lora_layers": weights,
                                          f"{family.folder}_lora_adapter_metadata": metadata}, weight_name=LORA_FILE)
    return {"file": LORA_FILE, "rank": config.r, "alpha": config.lora_alpha, "layers": len(weights) // 2}


def lora_adapter_file(path):
    """The LoRA adapter file that a --generator_init / --generator names: the file itself (a .safetensors of LoRA
    tensors), or a folder holding pytorch_lora_weights.safetensors and no model (config.json); else None."""
    if os.path.isdir(path):
        file = os.path.join(path, LORA_FILE)
        return file if os.path.isfile(file) and not os.path.isfile(os.path.join(path, "config.json")) else None
    if not (os.path.isfile(path) and path.endswith(".safetensors")):
        return None
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return path if any(".lora_A." in k or ".lora.down." in k for k in f.keys()) else None
    except Exception:  # unreadable: not an adapter; the weight-file loader says what is wrong with it
        return None


def teacher_with_lora(teacher, path, family):
    """The generator a LoRA adapter file stands for: the teacher's denoiser (an fp32 copy) with the adapter merged
    in. Read by diffusers' own loader (load_lora_adapter, what a pipeline's load_lora_weights calls for its
    denoiser), so the file means here what it means to any diffusers user. An adapter whose layers are not all the
    teacher's (another family's, another size) is one line."""
    import copy
    from peft.tuners.tuners_utils import BaseTunerLayer
    net = copy.deepcopy(teacher).float()
    load = lambda: net.load_lora_adapter(os.path.dirname(os.path.abspath(path)), weight_name=os.path.basename(path),
                                         prefix=family.folder, adapter_name="generator")
    load_or_die(load, path, f"the LoRA adapter onto the teacher's {family.denoiser}")
    wanted = {k.removeprefix(family.folder + ".").split(".lora")[0] for k in read_weights(path)}
    loaded = {n for n, m in net.named_modules() if isinstance(m, BaseTunerLayer)}
    if not loaded or wanted - loaded:
        die(f"the LoRA adapter '{path}' does not fit the teacher's {family.denoiser}: {len(wanted - loaded)} of its "
            f"{len(wanted)} layers are not the teacher's (e.g. {sorted(wanted - loaded or wanted)[0]}); pass the "
            "teacher it was trained on with --pretrained_model_name_or_path")
    return merged_lora(net, copy=False)


LICENSES = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",  # the base models' own cards
            "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
            "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
            "PixArt-alpha/PixArt-XL-2-512x512": "openrail++", "PixArt-alpha/PixArt-XL-2-1024-MS": "openrail++"}


FAMILY_TAGS = {"sd": "stable-diffusion", "sdxl": "stable-diffusion-xl", "pixart": "pixart-alpha",
               "sd3": "stable-diffusion-3"}


def base_license(teacher):
    """The teacher's licence: known for the families' usual hub ids, else read from the front matter of a local
    folder's README.md (huggingface-cli download --local-dir keeps it), else None."""
    readme = os.path.join(teacher, "README.md")
    if teacher in LICENSES or not os.path.isfile(readme):
        return LICENSES.get(teacher)
    from huggingface_hub import ModelCard
    try:
        return ModelCard.load(readme).data.license
    except Exception:  # a README without front matter
        return None


def write_model_card(folder, record, family=None):
    """README.md of a generator folder, as diffusers' training scripts write one (huggingface_hub's ModelCard with
    YAML front matter: base_model, license, library_name, tags; diffusers' populate_model_card): what it is, the
    teacher, the method, the run's settings, how to sample it in one step, and the last validation grid. Written
    from the same record as dipp.json."""
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData
    teacher, t_star, lora = record.get("teacher"), record["generator_timestep"], record.get("lora")
    run, recipe = record.get("training", {}), record.get("random_weights")
    hub_id = teacher if teacher and "teacher_relative" not in record else None
    licence = base_license(teacher) if teacher else None
    teacher = run.get("pretrained_model_name_or_path", teacher)  # a folder as the command named it
    data = ModelCardData(base_model=hub_id, library_name="diffusers", license=licence or "other",
                         license_name=None if licence else "see-base-model", pipeline_tag="text-to-image")
    tags = ["text-to-image", "diffusers", "one-step", "distillation", "diff-instruct-plus-plus", "dipp"]
    tags += (["lora"] if lora else []) + ([FAMILY_TAGS[family.name]] if family else [])
    title = family.title if family else "diffusion"
    lines = [f"# A one-step {title} generator trained with DI++" + (" (LoRA)" if lora else ""), "",
             f"The teacher's denoiser evaluated once, at t* = {t_star}, on pure noise: a one-step text-to-image "
             f"generator, trained with {PAPER} by dipp (`dipp.py`): the reward is maximised while an Integral-KL "
             f"divergence to the frozen teacher{' with CFG' if run else ''} keeps the images realistic. No image "
             "data is used.", ""]
    if recipe:
        lines += [f"**Random weights.** The teacher is dipp's random-weight test model (`--random_weights "
                  f"{recipe['shapes']}`, seed {recipe['seed']}): this generator exists to test the code; its images "
                  "are noise by design.", ""]
    if lora:
        lines += [f"`{LORA_FILE}` is a rank-{lora['rank']} LoRA adapter (α = {lora['alpha']}: scale α/r = "
                  f"{lora['alpha'] / lora['rank']:g}) on the teacher's {family.denoiser if family else 'denoiser'}, "
                  f"{lora['layers']} layers, in diffusers' LoRA format; `config.json` + "
                  "`diffusion_pytorch_model.safetensors` are the same generator merged into the whole denoiser.", ""]
    lines += ["## Training", "", "| | |", "|---|---|", f"| teacher (base model) | `{teacher or 'not recorded'}` |",
              "| method | Diff-Instruct++ (DI++), arXiv 2410.18881 |", f"| t* (`--generator_timestep`) | {t_star} |"]
    if run:
        batch = f"{run['train_batch_size']} × {run['processes']} process(es)"
        lines += [f"| reward r, α_rew (`--reward`, `--reward_scale`) | {run['reward']}, {run['reward_scale']:g} |",
                  f"| ω (`--guidance_scale`, the teacher's CFG) | {run['guidance_scale']:g} |",
                  f"| steps, batch | {run['max_train_steps']}, {batch} |",
                  f"| LoRA rank | {run['lora_rank'] or 'none (full fine-tuning)'} |",
                  f"| learning rates (generator, fake score) | {run['learning_rate']:g}, {run['fake_learning_rate']:g} |",
                  f"| precision, seed | {run['mixed_precision']}, {run['seed']} |",
                  f"| prompts | {run['prompts'] or 'the 8 built-in prompts (a smoke test)'} |",
                  f"| started from (`--generator_init`) | {run['generator_init'] or 'the teacher'} |", "",
                  f"Every setting: `{GENERATOR_RECORD}` (\"training\"), the machine-readable record."]
    lines += ["", "## Sampling in one step", ""] + sampling_code(folder, teacher, t_star, lora, family)
    grid = sorted((f for f in os.listdir(folder) if re.fullmatch(r"samples_\d+\.png", f)), key=lambda f: int(f[8:-4]))
    if grid:
        lines += ["", "## Samples", "", f"![validation grid]({grid[-1]})", "",
                  f"Held-out prompts (`--validation_prompts`) with fixed noise, at step {int(grid[-1][8:-4])}."]
    card = populate_model_card(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"), tags=tags)
    card.save(os.path.join(folder, "README.md"))


def sampling_code(folder, teacher, t_star, lora, family):
    """The card's commands that sample the generator in one step: a stock diffusers pipeline on the teacher (with
    load_lora_weights, or with the generator as its denoiser), and dipp.py --generate."""
    lines = []
    if family is not None:
        cls, denoiser = family.pipeline, family.denoiser
        lines += ["```python", "import torch", f"from diffusers import DDPMScheduler, {cls}"
                  + ("" if lora else f", {denoiser}"), ""]
        if lora:
            lines += [f'pipe = {cls}.from_pretrained("{teacher}", torch_dtype=torch.float16).to("cuda")',
                      f'pipe.load_lora_weights("{folder}", weight_name="{LORA_FILE}")  # (weight_name: needed offline)',
                      "pipe.fuse_lora()  # optional: the adapter merged into the weights, as fast as the base model"]
        else:
            lines += [f'{family.folder} = {denoiser}.from_pretrained("{folder}", torch_dtype=torch.float16)',
                      f'pipe = {cls}.from_pretrained("{teacher}", {family.folder}={family.folder}, '
                      'torch_dtype=torch.float16).to("cuda")']
        if family.forward_process == "flow":  # its own Euler step from σ_t* to 0 is x_t − σ v̂, as dipp samples
            lines[2] = lines[2].replace("DDPMScheduler, ", "")
            lines += ["# one Euler step of the flow from pure noise at σ_t* (its scheduler shifts (t* + 1)/1000) to 0",
                      f'image = pipe("a red bicycle", sigmas=[{(t_star + 1) / 1000:g}], guidance_scale=1).images[0]',
                      "```", ""]
        else:
            lines += ["# one step from pure noise at t*: DDPM's last step returns the denoiser's x̂0, as dipp samples",
                      "pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)",
                      f'image = pipe("a red bicycle", num_inference_steps=1, timesteps=[{t_star}], guidance_scale=1'
                      + (", clean_caption=False" if cls == "PixArtAlphaPipeline" else "") + ").images[0]",
                      "```", ""]
    lines += ["```bash", f'python dipp.py --generate "a red bicycle|a watercolor fox" --generator_init {folder}',
              "```", "", f"dipp reads t* and the teacher from `{GENERATOR_RECORD}`; guidance is off at sampling (the "
              "teacher's CFG was distilled in during training)."]
    return lines


def save_grid(images, prompts, path):
    """Images in [-1, 1] side by side, each with its prompt underneath, as one PNG."""
    from PIL import Image, ImageDraw
    pics = [Image.fromarray(((im.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())
            for im in images]
    w, h = max(256, pics[0].width), max(256, pics[0].height)
    grid = Image.new("RGB", (w * len(pics), h + 40), "white")
    for i, (pic, prompt) in enumerate(zip(pics, prompts)):
        grid.paste(pic.resize((w, h), Image.NEAREST), (i * w, 0))
        ImageDraw.Draw(grid).text((i * w + 4, h + 4), wrap_caption(prompt, 40, 2), fill="black")
    grid.save(path)


def save_images(images, prompts, folder):
    """dipp.py --generate's output: images in [-1, 1] (N, 3, H, W), one captioned PNG per prompt, generated_NN.png."""
    os.makedirs(folder, exist_ok=True)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        save_grid(image[None], [prompt], os.path.join(folder, f"generated_{i:02d}.png"))
    print(f"wrote {len(prompts)} images to {folder}")


def wrap_caption(text, width, lines):
    """At most `lines` lines of at most `width` characters, broken between words ("oil painting", not
    "oil pa/inting"); what does not fit ends in '...'."""
    import textwrap
    return "\n".join(textwrap.wrap(text, width, max_lines=lines, placeholder=" ...")) or text[:width]


def benchmark_clock(cfg, device):
    """time.perf_counter, preceded under --benchmark on a GPU by a sync: per-phase timings need the queued
    kernels to finish. Training itself waits only once a step (the log's .tolist())."""
    import time

    def clock():
        if cfg.benchmark and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return clock


def print_benchmark(timings, batch, fake_updates, world, device, startup_peak=None, settings=None, flops=None,
                    peak_tflops=lambda name: None):
    """One machine-readable line: the mean over the iterations after the first two (warm-up, which is
    also when --compile compiles: warmup_s); timings: (fake-score phase, generator phase) per iteration, with
    fake_updates updates in the first. On a GPU peak_memory_gib is the training loop's; startup_peak_gib the
    peak before it (loading, and PixArt's T5 encoding the prompts before it is freed). settings: the run's
    switches, reported as they are. flops: one iteration's FLOPs on this process (FirstIteration), from
    which achieved TFLOP/s and, where peak_tflops(device name) knows the card, the fraction of its peak."""
    import resource
    warm = timings[2:] or timings
    fake_s, gen_s = (sum(t[i] for t in warm) / len(warm) for i in (0, 1))
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    achieved = None if flops is None else flops / (fake_s + gen_s) / 1e12  # per process: each runs its own batch
    card_peak = peak_tflops(name) if device.type == "cuda" else None
    result = {
        "images_per_s": round(world * batch / (fake_s + gen_s), 4),
        "flop_per_iteration": flops,  # matmuls, convolutions, attention (cost.py says what is counted)
        "achieved_tflop_per_s": None if achieved is None else float(f"{achieved:.4g}"),
        "peak_tflop_per_s": card_peak,
        "fraction_of_peak": None if achieved is None or card_peak is None else round(achieved / card_peak, 4),
        "warmup_s": round(sum(map(sum, timings[:2])), 2),
        "s_per_generator_update": round(gen_s, 5), "s_per_fake_update": round(fake_s / fake_updates, 5),
        "peak_memory_gib": round(peak / 2 ** 30, 3),
        "startup_peak_gib": None if startup_peak is None else round(startup_peak / 2 ** 30, 3),
        "memory_kind": "cuda_allocated" if device.type == "cuda" else "cpu_rss",
        "batch": batch, "world": world, "iterations": len(warm), **(settings or {}),
        "device": name}
    print("BENCHMARK " + json.dumps(result))
    return result


# -----------------------------------------------------------------------------
# 8. FLOPs and card peaks, for --benchmark's achieved TFLOP/s (cost.py counts whole iterations with the same counter).
#    Attention is counted as the arithmetic it does (QKᵀ and PV: 4·B·heads·L_q·L_k·d forward, twice that backward)
#    whichever kernel runs it, so a count on the meta device, a CPU or a GPU agree (docs/cost.md).

aten = torch.ops.aten


def attention_flops(query, key, value, *rest, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query, key, value)  # 2 matmuls: 4·B·heads·L_q·L_k·d


def attention_backward_flops(grad_out, query, key, value, *rest, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count
    return 2 * sdpa_flop_count(query, key, value)  # each matmul's two gradients; no recomputed scores


MODEL_FLOPS = {  # FlopCounterMode's custom_mapping: attention ops whose arguments start (grad,) q, k, v
    aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,  # torch counts 0 for the CPU kernel
    aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward_flops,
    aten._scaled_dot_product_flash_attention_backward: attention_backward_flops,
    aten._scaled_dot_product_efficient_attention_backward: attention_backward_flops,
    aten._scaled_dot_product_cudnn_attention_backward: attention_backward_flops,
}


def flop_counter():
    """A FlopCounterMode with the attention convention above: `with flop_counter() as c: ...; c.get_total_flops()`."""
    from torch.utils.flop_counter import FlopCounterMode
    return FlopCounterMode(display=False, custom_mapping=MODEL_FLOPS)


class FirstIteration:
    """For dipp --benchmark: counts the FLOPs of the first training iteration (warm-up, which the timings leave
    out, so counting slows nothing that is reported). begin()/end() bracket an iteration; total: its FLOPs."""

    def __init__(self, active=True):
        self.mode, self.total, self.active = None, None, active

    def begin(self):
        if self.active and self.total is None and self.mode is None:
            self.mode = flop_counter().__enter__()

    def end(self):
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.total, self.mode = self.mode.get_total_flops(), None

# Cards: dense bf16 peak (no 2:4 sparsity), TFLOP/s, from the vendors' datasheets:
#    NVIDIA H100 Tensor Core GPU datasheet (SXM 989.4, PCIe 756.5 dense; NVL 835.5), H200 datasheet (989, as H100
#    SXM; H200 NVL 835.5), A100 datasheet (312, SXM and PCIe), L40/L40S datasheet (181.05 / 362.05 dense),
#    L4 datasheet (121 dense), A10 datasheet (125 dense), "NVIDIA Ada Lovelace GPU architecture" whitepaper v1.01
#    app. A (RTX 4090: 165.2 dense bf16 with fp32 accumulate; RTX 6000 Ada 364.2), "NVIDIA Ampere GA102 GPU
#    architecture" whitepaper (RTX A6000: 154.8 dense bf16; RTX 3090: 71 dense with fp32 accumulate),
#    B200 datasheet (HGX B200: 2250 dense per GPU, half the 4.5 PFLOPS sparse figure).
#    Keys are matched as substrings of torch.cuda.get_device_name(), longest key first ("H100 PCIe" before "H100").
#    Quoted from those documents' tables (only L40/L40S re-read online here). A name containing a key gets that key's
#    peak, so an unlisted variant can borrow a wrong one (an A10G would get the A10's): `python cost.py --device NAME`
#    prints the peak it uses.

PEAK_TFLOPS = {
    "H100 PCIe": 756.5, "H100 NVL": 835.5, "H100": 989.4,  # "NVIDIA H100 80GB HBM3" is the SXM card
    "H200 NVL": 835.5, "H200": 989.4, "GH200": 989.4,
    "A100": 312.0, "L40S": 362.05, "L40": 181.05, "L4": 121.0, "A10": 125.0,
    "RTX 6000 Ada": 364.2, "RTX 4090": 165.2, "RTX A6000": 154.8, "RTX 3090": 71.0, "B200": 2250.0,
}


def peak_tflops(device_name):
    """Dense bf16 peak TFLOP/s of a card named as torch.cuda.get_device_name() names it; None if unknown (or a CPU)."""
    name = (device_name or "").upper()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key.upper() in name:
            return PEAK_TFLOPS[key]
    return None


# Will it fit? Before dipp.py loads anything on a GPU it asks cost.py (`python cost.py --fit GIB`, a process of its
# own: cost.py builds dipp's networks to count them, so importing it from here or from dipp.py would be an import
# cycle) whether the run's counted peak fits the card's free memory, and stops with one line if it does not.
FIT_SHAPES = {"sd": "sd15", "sdxl": "sdxl", "pixart": "pixart512", "sd3": "sd35_medium"}  # real shapes in
# random_weights (an SD3 teacher whose name says "large" is counted at SD3.5-Large's)


def fit_flags(cfg, shapes, free, world=1):
    """`python cost.py` flags asking whether cfg's run fits `free` bytes (on `world` FSDP2 ranks with --shard fsdp)."""
    flags = ["--family", shapes, "--batch", str(cfg.train_batch_size), "--fit", f"{free / 2 ** 30:.3f}",
             "--ranks", str(world if cfg.shard == "fsdp" else 1)]
    for name in ("lora_rank", "fake_steps_per_G", "reward", "reward_decoder", "guidance_scale", "mixed_precision",
                 "ema_decay", "watch_rewards"):  # (watch_rewards holds --validation_diversity's CLIP: dipp.main)
        flags += [f"--{name}", str(getattr(cfg, name))]
    return flags + [f"--{name}" for name in ("gradient_checkpointing", "reuse_generator_sample") if getattr(cfg, name)]


def check_memory(cfg, device, family, world=1):
    """(CUDA only; --ignore_memory_check skips it) One line and exit where the run's peak memory per process, counted
    by cost.py on the meta device (minutes of CPU the first time, cached after), will not fit the free memory of
    `device`, naming the switches that would. family() -> the teacher's family name (called only here: on a hub id
    it reads model_index.json). A count that fails is a note, never a stop: the check must not block a run."""
    if device.type != "cuda" or cfg.ignore_memory_check:
        return
    shapes = cfg.random_weights or FIT_SHAPES.get(family())
    if shapes == "pixart512" and "512" not in cfg.pretrained_model_name_or_path:
        shapes = None  # PixArt-α at 1024 px has no shapes to count here
    if shapes == "sd35_medium" and "large" in cfg.pretrained_model_name_or_path.lower():
        shapes = "sd35_large"
    if not shapes:
        return
    free = torch.cuda.mem_get_info(device)[0]
    flags = fit_flags(cfg, shapes, free, world)
    print("will it fit? counting this run's memory on the meta device (python cost.py; once, then cached) ...",
          flush=True)
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, os.path.join(here, "cost.py"), *flags], capture_output=True, text=True,
                          cwd=here)
    try:
        verdict = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"(memory not checked: cost.py --fit failed: {last})")
        return
    if verdict["fits"]:
        return
    card = f"{torch.cuda.get_device_name(device)} has {free / 2 ** 30:.1f} GiB free"
    advice = (f"it fits with {' '.join(verdict['flags'])} (~{verdict['then']:.1f} GiB)" if verdict["flags"] else
              "no single-GPU setup dipp knows fits it (docs/cost.md, 'Which card?')")
    die(f"this run needs ~{verdict['need']:.1f} GiB per GPU (cost.py's count; a card needs 10 % + 1 GiB more) and "
        f"{card}: {advice}; --ignore_memory_check runs it anyway")

# -----------------------------------------------------------------------------
# 9. The run-keeper: everything dipp.train does around Alg. 1, behind a narrow interface


class RunKeeper:
    """What keeps a DI++ run alive around Alg. 1, so that dipp.train shows the method: RunKeeper(cfg) (torchrun,
    the device, precision, the output folder), wrap() the trained networks (compile, DDP or FSDP2), optimizer() for
    each, start() (resume, EMA, the log, the step-0 validation), then per step begin_step() and end_step(stats)
    inside guard(), and finish() (the curves, the benchmark line, the export). Nothing here changes the method's
    arithmetic: it saves, restores, logs, times and stops. Attributes dipp.train reads: device, rank, world,
    main_rank, autocast, dtype, step, benchmark (the BENCHMARK result, after finish)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed(cfg)
        self.main_rank = self.rank == 0  # only rank 0 writes files, logs and shows the progress bar
        self.writes = self.main_rank and not cfg.benchmark
        self.autocast, self.dtype = precision(cfg.mixed_precision, self.device)
        if not cfg.benchmark:  # one line for an unwritable folder; never mix this run with another's files
            prepare_output_dir(cfg, self.main_rank)
        self.step, self.benchmark, self.sharded, self.t0, self.family = 0, None, False, 0.0, None

    def wrap(self, G, fake, family, frozen=()):
        """Compile every network (before DDP wraps them), record the config, then wrap G and the fake score for
        training: returns (G, fake) as the training step calls them.
        Data parallel: DDP all-reduces (averages) gradients during backward, so each rank's update is the gradient
        of the mean loss over the global batch; saving and no-grad evaluation use the bare modules. --shard fsdp:
        FSDP2 shards G's denoiser and ψ in place instead (shard(); the same averaged update), so every rank runs each
        call of them, validation and saving included. The frozen teacher, VAE and reward stay whole."""
        cfg, self.family = self.cfg, family  # (the export's adapter file and model card need the family)
        if cfg.compile != "none":  # the frozen nets too: they run every step
            compile_nets(cfg, [G.net, fake] + [net for net in frozen if net is not None], self.device)
        self.sharded = cfg.shard == "fsdp" and self.world > 1  # (--shard fsdp in one process: a plain run)
        note = ", FSDP2" if self.sharded else ", one process: nothing to shard" if cfg.shard != "none" else ""
        record_config(cfg, self.main_rank, self.writes, f"(device: {self.device}, {self.world} process(es){note})")
        for net in (G.net, fake) if self.sharded else ():
            shard(net, family.shard_units, family.readout, self.dtype)
        return tuple(m if self.sharded else data_parallel(m, self.device, self.world) for m in (G, fake))

    def optimizer(self, net, lr):
        """AdamW on net's trainable parameters (Adam β from the config, no weight decay), fp16's loss scaler."""
        params = trainable(net)
        adamw = make_adam(params, lr, (self.cfg.adam_beta1, self.cfg.adam_beta2), self.device)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        return SafeOptimizer(params, adamw, scaler, self.cfg.max_grad_norm)

    def start(self, trained, opt, G, sample, reward_fn, val_prompts, latent_shape, watch=None, diversity=None):
        """Resume (--resume_from_checkpoint), set up the (optional) EMA of G, the log and the progress bar, and
        validate at step 0. trained: {"generator": G.net, "fake_score": ψ}, what a checkpoint holds; opt: the
        optimizers (.G, .fake); sample(z, prompts) -> images, reward_fn(images, prompts) -> (B,) or None; watch:
        {name: reward fn} also scored at each validation, not trained on; diversity: rewards.Diversity or None
        (held_out_reward)."""
        from tqdm import tqdm
        cfg, cuda = self.cfg, self.device.type == "cuda"
        self.trained, self.G, self.G_params = trained, G, opt.G.params
        self.states = dict(opt_G=opt.G.optimizer, opt_fake=opt.fake.optimizer, scaler_G=opt.G.scaler,
                           scaler_fake=opt.fake.scaler)  # checkpointed beside the weights
        self.fp16 = opt.G.scaler.is_enabled()
        self.ema = [p.detach().clone() for p in self.G_params] if cfg.ema_decay > 0 else None  # (optional) θ_ema
        if cfg.resume_from_checkpoint:
            self.step = load_checkpoint(cfg, trained, self.states, self.ema, self.rank, self.world, self.device)
        # the held-out reward (mean, spread) of sample(z_i, c_i) with the same z_i every time, and a sample grid;
        # the fixed noise comes from its own generator so the training RNG is untouched
        val_z = torch.randn((len(val_prompts), *latent_shape), generator=torch.Generator().manual_seed(cfg.seed))
        K = diversity.images_per_prompt if diversity is not None else 0  # (--validation_diversity: K per prompt)
        z_div = torch.randn((len(val_prompts) * K, *latent_shape),
                            generator=torch.Generator().manual_seed(cfg.seed + 1))  # (its own: val_z stays as it was)
        self.validate = lambda tag: held_out_reward(
            sample, reward_fn, val_prompts, val_z, cfg.train_batch_size, [self.autocast, ema_weights(self.G_params,
                                                                                                      self.ema)],
            os.path.join(cfg.output_dir, f"samples_{tag}.png") if self.main_rank else None, watch, diversity, z_div)
        self.validates = self.writes or (self.sharded and not cfg.benchmark)  # (a sharded G runs on every rank)
        self.clock = benchmark_clock(cfg, self.device)  # synced on a GPU only under --benchmark
        self.flops = FirstIteration(cfg.benchmark)  # --benchmark: the FLOPs of the first, untimed, iteration
        self.log = RunLog(cfg, self.step) if self.writes else None
        self.bar = tqdm(total=cfg.max_train_steps, initial=self.step, desc="dipp", dynamic_ncols=True,
                        disable=not self.main_rank)
        if self.step == 0 and self.validates:
            held_out = self.validate("0000")
            if self.writes:
                self.log.write({"step": 0, **held_out})
        self.timings, self.skipped = [], {"skipped_G": 0, "skipped_fake": 0}
        self.startup_peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)  # the benchmark's peak is the training loop's

    @contextlib.contextmanager
    def guard(self):
        """SIGINT/SIGTERM finish the step, checkpoint and exit (StopSignals); a non-finite loss is one line naming
        the last good checkpoint."""
        with StopSignals() as self.signals:
            try:
                yield
            except FloatingPointError as e:
                die_non_finite(self.cfg, self.step + 1, e)

    def begin_step(self):
        self.t0 = self.t1 = self.clock()
        if self.cfg.compile == "reduce-overhead":  # CUDA graphs: last iteration's graph outputs may be reused now
            torch.compiler.cudagraph_mark_step_begin()
        self.flops.begin()

    def between_phases(self):
        self.t1 = self.clock()  # the fake-score phase ends here (--benchmark times the two phases apart)

    def logs_reward_terms(self, reward_fn):
        """Whether this step logs a mix's per-term pulls: on the first and validation steps (each costs a decoder
        VJP per term), never under --benchmark (its FLOPs are the first iteration's), never for a single reward."""
        n, cfg = self.step + 1, self.cfg
        return (reward_fn is not None and len(reward_fn.terms) > 1 and not cfg.benchmark
                and (n == 1 or n % cfg.validation_steps == 0 or n == cfg.max_train_steps))

    def end_step(self, stats):
        """After one DI++ iteration: EMA, the global-batch means over ranks, the log line, and on their steps a
        checkpoint and a validation; a signal that reached any rank stops every rank here."""
        cfg = self.cfg
        self.flops.end()
        for k in self.skipped:  # fp16 overflow: GradScaler skipped the update; counted, not hidden
            self.skipped[k] += stats[k]
        if self.ema is not None:  # (optional) θ_ema ← d·θ_ema + (1 − d)·θ
            ema_update(self.ema, self.G_params, cfg.ema_decay)
        self.step += 1
        # global-batch means over ranks (and whether a signal reached any rank); waits for the step's GPU work
        logged = ("loss_fake", "loss_ikl", "reward", "grad_ikl", "grad_reward") + tuple(  # (+ a mix's terms)
            k for k in stats if k.startswith(("grad_reward_", "reward_")))
        values, stop = global_means({k: stats[k] for k in logged}, self.signals.requested, self.world)
        t2 = self.clock()
        self.timings.append((self.t1 - self.t0, t2 - self.t1))
        stats = {"step": self.step, **values, "grad_ratio": values["grad_reward"] / max(values["grad_ikl"], 1e-30),
                 "img_per_s": self.world * cfg.train_batch_size / (t2 - self.t0), **(self.skipped if self.fp16 else {})}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if k not in ("step", "loss_ikl")})
        self.bar.update(1)
        if cfg.benchmark:
            return
        last = self.step == cfg.max_train_steps or stop
        if self.step % cfg.checkpointing_steps == 0 or last:
            rng = rng_states(self.device, self.world)  # a collective: every rank's RNG, so resume replays nothing
            # every rank calls it (a sharded net is gathered whole first); rank 0 writes
            save_checkpoint(cfg, self.step, self.trained, self.G.t_star, self.states, self.ema, rng,
                            write=self.main_rank)
        validate = self.validates and (self.step % cfg.validation_steps == 0 or last)
        held_out = self.validate(f"{self.step:04d}") if validate else {}
        if self.main_rank:
            self.log.write({**stats, **held_out})
        if stop:  # checkpoint-{step} is written: say how to resume, exit 130 (SIGINT) or 143 (SIGTERM)
            self.bar.close()
            self.signals.exit(cfg, self.step, self.log if self.main_rank else None)

    def finish(self):
        """The benchmark line (--benchmark), the log's curves.png, and the generator exported to
        output_dir/generator: its EMA weights when kept (G itself keeps the raw ones)."""
        cfg = self.cfg
        self.bar.close()
        if cfg.benchmark and self.main_rank:
            switches = ("mixed_precision", "gradient_checkpointing", "lora_rank", "compile", "reuse_generator_sample")
            self.benchmark = print_benchmark(self.timings, cfg.train_batch_size, cfg.fake_steps_per_G, self.world,
                                             self.device, self.startup_peak, {k: getattr(cfg, k) for k in switches},
                                             self.flops.total, peak_tflops)
        if self.writes:
            self.log.close()  # also draws curves.png from log.jsonl
        if not cfg.benchmark:  # every rank calls it (a sharded generator is gathered whole first); rank 0 writes
            with ema_weights(self.G_params, self.ema):
                export_generator(self.G.net, self.G.t_star, os.path.join(cfg.output_dir, "generator"),
                                 write=self.writes, cfg=cfg, family=self.family)


if __name__ == "__main__":  # python plumbing.py curves runs/x/log.jsonl  -> runs/x/curves.png
    if len(sys.argv) != 3 or sys.argv[1] != "curves" or not os.path.isfile(sys.argv[2]):
        raise SystemExit("usage: python plumbing.py curves OUTPUT_DIR/log.jsonl  (writes curves.png beside it)")
    print(plot_curves(sys.argv[2], os.path.join(os.path.dirname(os.path.abspath(sys.argv[2])), "curves.png")))
