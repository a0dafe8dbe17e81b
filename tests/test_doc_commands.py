"""Every instruction in the documentation works as written.

The documents are README.md, docs/*.md and BENCHMARKS.md. From each, the test takes the fenced shell
blocks (```bash, ```sh, ```shell, ```console, and untagged blocks whose first command is one of
``moma``, ``python``, ``make``, ``torchrun``), joins ``\\`` continuations, drops comments, splits
lines at ``;``, ``&``, ``&&``, ``||`` and ``|``, and drops ``VAR=value`` prefixes. Shell words
(``for``, ``do``, ``done``, ``wait``) are not commands; ``$VAR`` and ``$((...))`` read as ``1``.

Every ``moma`` command (also after ``torchrun ... -m moma`` or ``python -m moma``, and inline
``moma`` spans of prose that name a ``.yaml`` config and hold no placeholder such as ``CKPT`` or
``...``):

1. is parsed by the real argument parser (``moma.cli.build_parser``);
2. has its config built the way the CLI builds it: the config file (resolved from the repository
   root), the shortcut flags and every ``--set`` through ``moma.config.load_config`` plus the
   method's ``distill.params`` check (``moma config``), or ``moma.compare.config.load_compare_config``
   for ``moma compare``. A ``--set`` whose value is the placeholder ``...`` has its key checked
   against the schema only; so has every ``--set`` of a compare config the docs only name
   (``my.yaml``);
3. where its teacher is a run folder an earlier command of the same document trains, and its method
   needs the student's architecture, has the two architectures compared.

Fenced ```yaml blocks are training configs (top-level keys are config sections) or compare
configs (anything else): every key path must exist in the schema, and a block with every part a
loader needs (no ``...`` placeholder left but whole mappings written as ``{...}``) goes through the
real loader. Inline ``--set`` spans of prose are checked the same way.

Then the commands run, in document order, each document in its own scratch folder holding links to
the repository's ``data/`` and ``configs/`` (so the documented relative paths resolve and nothing is
written into the repository), in this process through ``moma.cli.main``:

* ``moma train``/``distill`` run with ``TINY_RUN`` appended (test_resnet, 32 px, one epoch of two
  steps), ``moma compare`` with ``tiny_compare_args`` (test_resnet, one step per epoch, one fold);
  the other sub-commands run as written.
* A command is not run, for a reason it reports, when it reads a placeholder of the user's own
  files (``PLACEHOLDERS``; ``STAND_INS`` maps a few of them to shipped tiles instead, so that they
  run), or something a command that did not run writes. A path it reads that is none of these
  (neither shipped, nor a known placeholder, nor written earlier) fails the test: a misspelt path.
* ``moma compare`` trains only the smoke grid, once per document (every other grid takes minutes
  to hours; its config is still loaded and checked); ``--report-only`` runs when its folder exists.
* ``make``, ``pip``, ``python -m venv`` and ``torchrun`` lines are checked (the Make target and the
  package extra exist) but not run; ``python benchmarks/X.py``/``scripts/X.py`` lines are checked
  (the script exists and accepts every ``--flag`` given) but not run (minutes each).
* A block preceded by ``<!-- doc-test: skip REASON -->`` is checked but not run (none needs it
  today). Any other command the test does not know fails: teach the test, or mark the block.

Finally no document refers to issue numbers or to how the work was organised
(``ORGANISATION``).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from moma.errors import MomaError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")), "BENCHMARKS.md"]

SHELL_LANGS = {"bash", "sh", "shell", "console"}
COMMAND_WORDS = {"moma", "python", "python3", "make", "torchrun"}
SHELL_WORDS = {"for", "while", "if", "then", "else", "fi", "do", "done", "wait", "set", "export", "cd", "echo"}
SKIP_MARK = re.compile(r"<!--\s*doc-test:\s*skip\s*(.*?)\s*-->")

# Paths the docs use for the user's own files: a command that reads one is checked, not run.
PLACEHOLDERS = {
    "slides": "whole-slide images are the user's (none is shipped)",
    "annotations": "QuPath annotations are the user's",
    "my_labelled_tiles": "the user's labelled tiles",
    "tiles": "tiles from the user's slides (`moma tile` output)",
    "effnet.pth": "a teacher's weights from elsewhere",
    "ssl_resnet50.pth": "a teacher's weights from elsewhere",
    "my-timm-model": "a timm model folder from elsewhere",
    "runs/teacher": "the user's teacher run folder",
    "my.yaml": "the user's compare config",
}
# Placeholders a shipped folder stands in for, so that the commands reading them run.
STAND_INS = {"path/to/tiles": "data/demo/glas_colon/benign"}
# Appended to every `moma train` and `moma distill` that runs: seconds, not minutes.
TINY_RUN = ["--set", "model.arch=test_resnet", "--set", "data.image_size=32", "--set", "optim.epochs=1",
            "--set", "optim.total_steps=2", "--set", "optim.batch_size=16", "--set", "train.progress=false",
            "--set", "train.tensorboard=false", "--set", "augment.randaugment=false", "--set", "data.num_workers=0"]
RUNNABLE_GRIDS = {"configs/compare/smoke.yaml"}

# References to issue numbers or to how the work was organised; user docs speak of the software.
ORGANISATION = [r"\bissues?\s*#?\d+", r"(?<![\w&/])#\d+\b", r"\bsessions?\b", r"\bthe issue\b", r"\bbrief\b",
                r"\b(?:TODO|FIXME)\b"]


# --------------------------------------------------------------------------- extraction
@dataclass
class Block:
    doc: str
    line: int  # 1-based line of the block's first content line
    lang: str
    lines: list[str]
    skip: str | None = None  # reason of a `<!-- doc-test: skip ... -->` mark


@dataclass
class Command:
    doc: str
    line: int
    words: list[str]
    skip: str | None = None

    def where(self) -> str:
        return f"{self.doc}:{self.line}: `{' '.join(self.words)}`"


FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


def fenced_blocks(text: str, doc: str) -> list[Block]:
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang = match.group(1), match.group(2).lower()
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = SKIP_MARK.search(previous)
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence[:3]):
            body.append(lines[j])
            j += 1
        blocks.append(Block(doc, i + 2, lang, body, (mark.group(1) or "marked skip") if mark else None))
        i = j + 1
    return blocks


def is_shell(block: Block) -> bool:
    if block.lang in SHELL_LANGS:
        return True
    if block.lang:
        return False
    first = next((line.split()[0] for line in block.lines if line.strip() and not line.lstrip().startswith("#")), "")
    return first in COMMAND_WORDS


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """``(line, text)`` with ``\\`` continuations joined; ``console`` blocks keep only ``$`` lines."""
    out, current, start = [], "", 0
    for offset, raw in enumerate(block.lines):
        line = raw.rstrip()
        if not current:
            start = block.line + offset
            if block.lang == "console":
                if not line.lstrip().startswith("$ "):
                    continue
                line = line.lstrip()[2:]
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        out.append((start, current + line))
        current = ""
    if current:
        out.append((start, current))
    return out


SEPARATORS = {";", "&", "&&", "||", "|", ";;"}
ENV_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def split_commands(text: str) -> list[list[str]]:
    """One logical shell line as simple commands (words), without comments and env prefixes."""
    text = re.sub(r"\$\(\([^)]*\)\)", "1", text)  # $((k + 1)) -> 1
    text = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "1", text)  # $k, ${VAR} -> 1
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token in SEPARATORS:
            commands.append(words)
            words = []
        else:
            words.append(token)
    commands.append(words)
    out = []
    for words in commands:
        while words and ENV_PREFIX.match(words[0]):
            words = words[1:]
        while words and words[0] in {"do", "then", "else"}:
            words = words[1:]
        if words and words[0] not in SHELL_WORDS:
            out.append(words)
    return out


def doc_commands(text: str, doc: str) -> list[Command]:
    commands = []
    for block in fenced_blocks(text, doc):
        if not is_shell(block):
            continue
        for line, logical in logical_lines(block):
            for words in split_commands(logical):
                commands.append(Command(doc, line, words, block.skip))
    return commands


INLINE = re.compile(r"`([^`\n]+)`")
INLINE_PLACEHOLDER = re.compile(r"\.\.\.|\||\b[A-Z][A-Z_/]{2,}\b")


def inline_spans(text: str) -> list[tuple[int, str]]:
    """``(line, span)`` of the backticked spans of prose (not of fenced blocks)."""
    out, in_fence = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            out.extend((number, span) for span in INLINE.findall(line))
    return out


# --------------------------------------------------------------------------- schema
def _unwrap(annotation: Any) -> Any:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        options = [_unwrap(a) for a in get_args(annotation) if a is not type(None)]
        for option in options:
            if (isinstance(option, type) and issubclass(option, BaseModel)) or get_origin(option) is dict:
                return option
        return options[0] if options else Any
    return annotation


def unknown_key(schema: type[BaseModel], path: list[str]) -> str | None:
    """The first prefix of the dotted ``path`` that ``schema`` does not have (``'optim.epochz'``), or None.
    A mapping of names (``teachers``, ``methods``, ``params``) takes any name; a compare config's
    ``base`` and a setting's or teacher's training sections are the training config's."""
    from moma.compare.config import SECTIONS, CompareConfig, SectionOverrides
    from moma.config import Config

    node: Any = schema
    for i, part in enumerate(path):
        node = _unwrap(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            if part not in node.model_fields:
                return ".".join(path[: i + 1])
            if node is CompareConfig and part == "base":
                node = Config
            elif issubclass(node, SectionOverrides) and part in SECTIONS:
                node = Config.model_fields[part].annotation
            else:
                node = node.model_fields[part].annotation
        elif get_origin(node) is dict:
            node = get_args(node)[1]
        else:
            return None  # a value (a list, a scalar, Any): nothing below it to check
    return None


def key_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[list[str]]:
    """Every dotted key path of a YAML mapping, leaves and sections alike; ``...`` keys are skipped."""
    if not isinstance(tree, dict):
        return []
    out = []
    for key, value in tree.items():
        if key == "...":
            continue
        path = (*prefix, str(key))
        out.append(list(path))
        out.extend(key_paths(value, path))
    return out


def without_placeholders(tree: Any) -> tuple[Any, bool]:
    """``tree`` without ``{...}`` entries, and whether a ``...`` value is left (not loadable then)."""
    if isinstance(tree, dict):
        out, loadable = {}, True
        for key, value in tree.items():
            if key == "...":
                continue
            out[key], ok = without_placeholders(value)
            loadable &= ok
        return out, loadable
    if isinstance(tree, list):
        items = [without_placeholders(v) for v in tree]
        return [v for v, _ in items], all(ok for _, ok in items)
    return tree, tree not in ("...", Ellipsis)


def is_training_tree(tree: dict) -> bool:
    from moma.config import Config

    return bool(tree) and set(tree) <= set(Config.model_fields)


def check_yaml_block(block: Block) -> list[str]:
    from moma.compare.config import CompareConfig, build_compare_config, methods_as_mapping
    from moma.config import Config, build_config

    where = f"{block.doc}:{block.line}: yaml block"
    try:
        tree = yaml.safe_load("\n".join(block.lines))
    except yaml.YAMLError as exc:
        return [f"{where}: not valid YAML ({exc})"]
    if not isinstance(tree, dict):
        return [f"{where}: not a mapping; mark it `<!-- doc-test: skip REASON -->` if it is not a config"]
    schema = Config if is_training_tree(tree) else CompareConfig
    problems = [f"{where}: unknown config key '{bad}'" for bad in
                dict.fromkeys(filter(None, (unknown_key(schema, path) for path in key_paths(tree))))]
    if problems:
        return problems
    loadable, complete = without_placeholders(tree)
    if not complete:
        return []
    try:
        if schema is Config:
            build_config(loadable, where)
        elif "settings" in loadable and "methods" in loadable:
            loadable["methods"] = methods_as_mapping(loadable["methods"])
            build_compare_config(loadable, where)
    except (MomaError, ValueError) as exc:
        return [str(exc)]
    return []


# --------------------------------------------------------------------------- checking commands
@dataclass
class Checked:
    command: Command
    argv: list[str] = field(default_factory=list)  # moma's arguments
    args: Any = None
    cfg: Any = None
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    not_run: str | None = None  # why it is never run, whatever exists


def _norm(path: str | Path | None) -> str | None:
    if path is None:
        return None
    text = str(path).rstrip("/")
    return text[2:] if text.startswith("./") else text


def _repo_file(path: str) -> Path | None:
    candidate = ROOT / path
    return candidate if candidate.is_file() else None


def _parse(argv: list[str]):
    from moma.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv), None
    except SystemExit:
        lines = [line for line in err.getvalue().strip().splitlines() if line]
        return None, lines[-1] if lines else "argument parser refused it"


def _split_placeholder_sets(overrides: list[str]) -> tuple[list[str], list[list[str]]]:
    """``--set`` overrides to load, and the key paths of those whose value is the placeholder ``...``."""
    loadable, keys_only = [], []
    for text in overrides:
        key, _, value = text.partition("=")
        if value.strip() == "...":
            keys_only.append([p for p in key.strip().split(".") if p])
        else:
            loadable.append(text)
    return loadable, keys_only


def check_moma(command: Command, argv: list[str], runs: dict[str, Any]) -> Checked:
    """Parse, build the config, check what can be checked without running; ``runs`` maps the run
    folders earlier commands of the document train to their config."""
    from moma.commands.training import shortcut_overrides
    from moma.compare.config import CompareConfig, load_compare_config
    from moma.config import Config, load_config
    from moma.engine.builder import resolve_method

    item = Checked(command, [word for word in argv if word != "..."])
    if "..." in argv:
        item.not_run = "the command is elided (`...`); what is written of it is checked"
    argv = item.argv
    args, error = _parse(argv)
    if args is None or args.command is None:
        item.problems.append(f"{command.where()}: {error or 'no sub-command'}")
        return item
    item.args, sub = args, args.command
    try:
        if sub in ("train", "distill", "config"):
            overrides, keys_only = _split_placeholder_sets(shortcut_overrides(args) + args.overrides)
            for path in keys_only:
                if bad := unknown_key(Config, path):
                    item.problems.append(f"{command.where()}: unknown config key '{bad}'")
            resume = getattr(args, "resume", None)
            if resume:
                item.inputs.append(_norm(resume))
                item.cfg = None
            else:
                config = args.config
                if config and not _repo_file(config):
                    if _norm(config) in PLACEHOLDERS:
                        item.inputs.append(_norm(config))
                        config = None
                    else:
                        item.problems.append(f"{command.where()}: config file {config} is not in the repository")
                        return item
                cfg = load_config(ROOT / config if config else None, overrides)
                method_cls, _ = resolve_method(cfg)
                item.cfg = cfg
                if sub == "train" and cfg.distill.method != "none":
                    item.problems.append(f"{command.where()}: `moma train` refuses distill.method "
                                         f"'{cfg.distill.method}'; use `moma distill`")
                if sub != "config":
                    item.inputs += [_norm(args.config), _norm(cfg.data.source), _norm(cfg.distill.teacher),
                                    _norm(cfg.model.weights), _norm(cfg.data.split_file)]
                    item.inputs += [_norm(p) for p in cfg.data.unlabelled if p != "rest"]
                    run_dir = _norm(Path(cfg.run.output_dir) / cfg.run.name)
                    item.outputs.append(run_dir)
                    runs[run_dir] = cfg
                    item.problems += _architecture_problems(command, cfg, method_cls, runs)
        elif sub == "compare":
            overrides, keys_only = _split_placeholder_sets(args.overrides)
            for path in keys_only + ([] if _repo_file(args.config) else
                                     [[p for p in o.partition("=")[0].split(".") if p] for o in overrides]):
                if bad := unknown_key(CompareConfig, path):
                    item.problems.append(f"{command.where()}: unknown compare key '{bad}'")
            if _repo_file(args.config):
                item.cfg = load_compare_config(ROOT / args.config, overrides)
                folder = _norm(args.out or Path(item.cfg.output_dir) / item.cfg.name)
                (item.inputs if args.report_only else item.outputs).append(folder)
            elif _norm(args.config) not in PLACEHOLDERS:
                item.problems.append(f"{command.where()}: compare config {args.config} is not in the repository")
            item.inputs.append(_norm(args.config))
        elif sub == "evaluate":
            item.inputs += [_norm(args.checkpoint), _norm(args.data), _norm(args.split_file)]
            if args.out:
                item.outputs.append(_norm(args.out))
        elif sub == "predict":
            item.inputs += [_norm(args.checkpoint), _norm(args.folder), *map(_norm, args.slides)]
            item.outputs.append(_norm(args.out))
        elif sub in ("export", "info"):
            item.inputs.append(_norm(args.checkpoint))
            item.outputs.append(_norm(getattr(args, "out", None)))
        elif sub == "import-teacher":
            item.inputs.append(_norm(args.source))
            item.outputs.append(_norm(args.out))
        elif sub == "embed":
            item.inputs += [_norm(args.teacher), *map(_norm, args.data), _norm(args.stain_reference)]
            item.outputs.append(_norm(args.out))
        elif sub == "tile":
            item.inputs += [*map(_norm, args.inputs), _norm(args.annotations)]
            item.outputs.append(_norm(args.out))
    except MomaError as exc:
        item.problems.append(f"{command.where()}: {str(exc).replace(f'{ROOT}/', '')}")
    item.inputs = [p for p in item.inputs if p]
    item.outputs = [p for p in item.outputs if p]
    return item


def _run_folder_of(path: str, runs: dict[str, Any]) -> Any:
    for folder, cfg in runs.items():
        if path == folder or path.startswith(folder + "/"):
            return cfg
    return None


def _architecture_problems(command: Command, cfg, method_cls, runs: dict[str, Any]) -> list[str]:
    """A teacher an earlier documented command trains has a known architecture: check it as a run would."""
    teacher = _run_folder_of(_norm(cfg.distill.teacher) or "", runs) if cfg.distill.teacher else None
    if teacher is None or teacher is cfg:
        return []
    problems = []
    if method_cls.requires_same_architecture(method_cls.parse_params(cfg.distill.params)) and teacher.model.arch != cfg.model.arch:
        problems.append(f"{command.where()}: distill.method '{method_cls.name}' needs a teacher of the student's "
                        f"architecture; the teacher is {teacher.model.arch}, the student {cfg.model.arch}")
    if cfg.distill.student_init == "teacher" and teacher.model.arch != cfg.model.arch:
        problems.append(f"{command.where()}: distill.student_init=teacher with a {teacher.model.arch} teacher "
                        f"and a {cfg.model.arch} student")
    return problems


def check_script(command: Command, words: list[str]) -> Checked:
    item = Checked(command, not_run="a benchmark or maintenance script (minutes); its flags are checked")
    script = words[0]
    path = _repo_file(script)
    if path is None:
        item.problems.append(f"{command.where()}: {script} is not in the repository")
        return item
    source = path.read_text()
    for word in words[1:]:
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and f'"{flag}"' not in source and f"'{flag}'" not in source:
            item.problems.append(f"{command.where()}: {script} has no option {flag}")
    return item


def check_command(command: Command, runs: dict[str, Any]) -> Checked:
    words = command.words
    head = words[0]
    if head == "moma":
        return check_moma(command, words[1:], runs)
    if head in ("python", "python3") and words[1:3] == ["-m", "moma"]:
        return check_moma(command, words[3:], runs)
    if head == "torchrun":
        if "-m" in words and words[words.index("-m") + 1: words.index("-m") + 2] == ["moma"]:
            item = check_moma(command, words[words.index("-m") + 2:], runs)
            item.not_run = "torchrun starts several processes; the moma command is checked"
            return item
        return Checked(command, problems=[f"{command.where()}: torchrun without `-m moma`"])
    if head in ("python", "python3") and words[1:3] == ["-m", "venv"]:
        return Checked(command, not_run="creates the environment the tests run in")
    if head in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
        return check_script(command, words[1:])
    if head == "make":
        makefile = (ROOT / "Makefile").read_text()
        missing = [target for target in words[1:]
                   if not target.startswith("-") and not re.search(rf"^{re.escape(target)}:", makefile, re.M)]
        return Checked(command, not_run="make builds the environment or runs the whole suite",
                       problems=[f"{command.where()}: no Makefile target {t}" for t in missing])
    if head.endswith("pip") and "install" in words:
        pyproject = (ROOT / "pyproject.toml").read_text()
        problems = []
        for extra in re.findall(r"\.\[([\w,-]+)\]", " ".join(words)):
            for name in extra.split(","):
                if not re.search(rf"^{re.escape(name)}\s*=", pyproject, re.M):
                    problems.append(f"{command.where()}: pyproject.toml has no extra [{name}]")
        return Checked(command, not_run="installs the package", problems=problems)
    return Checked(command, problems=[
        f"{command.where()}: the documentation test does not know this command; teach tests/test_doc_commands.py "
        "or mark its block `<!-- doc-test: skip REASON -->`"])


def check_inline_sets(doc: str, line: int, span: str) -> list[str]:
    from moma.compare.config import CompareConfig
    from moma.config import Config, load_config

    words = shlex.split(span)
    overrides = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--set"]
    problems = []
    for text in overrides:
        key, _, value = text.partition("=")
        path = [p for p in key.strip().split(".") if p]
        if path[:1] == ["section"]:  # `--set section.key=value`: the syntax itself
            continue
        training = path[0] in Config.model_fields
        if bad := unknown_key(Config if training else CompareConfig, path):
            problems.append(f"{doc}:{line}: `{span}`: unknown {'config' if training else 'compare'} key '{bad}'")
        elif training and value.strip() != "...":
            try:
                load_config(None, [text])
            except MomaError as exc:
                problems.append(f"{doc}:{line}: `{span}`: {exc}")
    return problems


def check_document(text: str, doc: str) -> tuple[list[Checked], list[str]]:
    """Every command of the document checked in order, and every problem found (commands, YAML
    blocks, inline ``--set`` and ``moma`` spans)."""
    runs: dict[str, Any] = {}
    checked = [check_command(command, runs) for command in doc_commands(text, doc)]
    problems = [p for item in checked for p in item.problems]
    for block in fenced_blocks(text, doc):
        if block.lang in ("yaml", "yml") and not block.skip:
            problems += check_yaml_block(block)
    for line, span in inline_spans(text):
        if span.startswith("--set "):
            problems += check_inline_sets(doc, line, span)
        elif span.startswith("moma ") and ".yaml" in span and not INLINE_PLACEHOLDER.search(span):
            for words in split_commands(span):
                problems += check_command(Command(doc, line, words), dict(runs)).problems
    return checked, problems


# --------------------------------------------------------------------------- tests: checking
@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_and_config_key_is_accepted(doc):
    _, problems = check_document((ROOT / doc).read_text(), doc)
    assert not problems, "documented commands or config keys the code refuses:\n" + "\n".join(problems)


def test_the_checker_reports_a_misspelt_key_in_a_command_a_yaml_block_and_prose():
    text = "\n".join([
        "# synthetic", "",
        "```bash",
        "OMP_NUM_THREADS=1 moma train configs/demo/teacher_lung.yaml \\",
        "    --set optim.epochz=3 --name t   # a comment",
        "moma compare configs/compare/smoke.yaml --set methods.kd.kl_wieght=0.5 &",
        "```", "",
        "```yaml",
        "optim: {epochs: 3, lr_bse: 0.1}",
        "```", "",
        "```yaml",
        "base: {...}",
        "settings: {s: {teacher: t, data: {sorce: x}}}",
        "methods: [none]",
        "```", "",
        "Or `--set augment.stain_jiter=0.05`.",
    ])
    _, problems = check_document(text, "synthetic.md")
    report = "\n".join(problems)
    for fragment in ("synthetic.md:4:", "optim.epochz", "methods.kd.kl_wieght", "synthetic.md:10: yaml block",
                     "optim.lr_bse", "settings.s.data.sorce", "augment.stain_jiter"):
        assert fragment in report, report
    assert len(problems) == 5, report


def test_the_checker_catches_a_method_that_refuses_the_documented_teacher():
    text = "\n".join([
        "```bash",
        "moma train configs/demo/teacher_lung.yaml --name my-teacher",
        "moma distill configs/demo/teacher_lung.yaml --method moma --teacher runs/my-teacher/best.safetensors "
        "--arch resnet18 --set distill.params.keys=momentum",
        "moma distill configs/demo/teacher_lung.yaml --method crd --teacher runs/my-teacher --arch resnet18",
        "moma evalute runs/x data",
        "```",
    ])
    _, problems = check_document(text, "x.md")
    assert len(problems) == 2, problems
    assert "x.md:3:" in problems[0] and "teacher is efficientnet_b0, the student resnet18" in problems[0]
    assert "x.md:5:" in problems[1] and "invalid choice: 'evalute'" in problems[1]


def test_shell_lines_split_into_commands():
    assert split_commands("OMP_NUM_THREADS=1 moma compare a.yaml --shard 1/2 &") == [
        ["moma", "compare", "a.yaml", "--shard", "1/2"]]
    assert split_commands("wait; moma compare a.yaml --report-only   # the tables") == [
        ["moma", "compare", "a.yaml", "--report-only"]]
    assert split_commands("CUDA_VISIBLE_DEVICES=$k moma compare p.yaml --shard $((k + 1))/4 &") == [
        ["moma", "compare", "p.yaml", "--shard", "1/4"]]
    assert split_commands('python3 -m venv .venv && .venv/bin/pip install -e ".[test]"') == [
        ["python3", "-m", "venv", ".venv"], [".venv/bin/pip", "install", "-e", ".[test]"]]
    assert split_commands("for k in 0 1; do") == [] and split_commands("#SBATCH --array=1-16") == []
    block = Block("d.md", 3, "bash", ["# one", "moma train c.yaml \\", "    --name x", "moma methods"])
    assert logical_lines(block)[1:] == [(4, "moma train c.yaml      --name x"), (6, "moma methods")]


def test_a_skip_mark_an_untagged_block_and_a_path_nobody_provides(tmp_path):
    text = "\n".join([
        "<!-- doc-test: skip needs a GPU -->", "```bash", "moma methods", "```",
        "```", "moma methods --defaults", "```",
        "```", "data/external/x.tif   the teacher's tiles", "```",
        "```bash", "moma predict runs/nowhere/best.safetensors data/demo/glas_colon", "```"])
    checked, problems = check_document(text, "d.md")
    assert not problems
    assert [(item.command.line, item.command.words[1:], item.command.skip) for item in checked] == [
        (3, ["methods"], "needs a GPU"), (6, ["methods", "--defaults"], None),
        (12, ["predict", "runs/nowhere/best.safetensors", "data/demo/glas_colon"], None)]
    scratch = tmp_path / "work"
    _prepare_scratch(scratch)
    assert not_run_reason(checked[0], scratch, {}, set()) == "block marked skip: needs a GPU"
    assert not_run_reason(checked[1], scratch, {}, set()) is None
    assert "which line 9 writes" in not_run_reason(checked[2], scratch, {"runs/nowhere": "9"}, set())
    with pytest.raises(AssertionError, match="reads runs/nowhere/best.safetensors: not shipped"):
        not_run_reason(checked[2], scratch, {}, set())


# --------------------------------------------------------------------------- tests: the words
def test_docs_name_no_issue_numbers_or_how_the_work_was_organised():
    hits = []
    for doc in DOCS:
        for number, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
            for pattern in ORGANISATION:
                for match in re.finditer(pattern, line, re.IGNORECASE):
                    hits.append(f"{doc}:{number}: '{match.group(0)}' in: {line.strip()}")
    assert not hits, "user docs speak of the software and its evidence, not of the work:\n" + "\n".join(hits)


# --------------------------------------------------------------------------- tests: running
def tiny_compare_args(cfg) -> list[str]:
    """One step per epoch, one fold, teachers one epoch: the grid's every cell still trains."""
    sets = ["base.model.arch=test_resnet", "base.data.image_size=32", "base.optim.epochs=1",
            "base.train.max_steps_per_epoch=1", "base.train.progress=false", "base.train.tensorboard=false",
            "base.data.num_workers=0", "folds=1"]
    sets += [f"teachers.{name}.optim.epochs=1" for name, spec in cfg.teachers.items()
             if not spec.checkpoint and "epochs" in spec.optim]
    return [word for text in sets for word in ("--set", text)]


def _covered(path: str, folders: list[str]) -> str | None:
    return next((f for f in folders if path == f or path.startswith(f + "/")), None)


def not_run_reason(item: Checked, scratch: Path, skipped_outputs: dict[str, str], grids_run: set[str]) -> str | None:
    """Why ``item`` is not run now, None to run it; raises AssertionError for a path nobody provides."""
    if item.command.skip:
        return f"block marked skip: {item.command.skip}"
    if item.not_run:
        return item.not_run
    for path in item.inputs:
        if (scratch / path).exists():
            continue
        if placeholder := _covered(path, list(PLACEHOLDERS)):
            return f"reads {path}: {PLACEHOLDERS[placeholder]}"
        if folder := _covered(path, list(skipped_outputs)):
            return f"reads {path}, which line {skipped_outputs[folder]} writes (not run)"
        raise AssertionError(f"{item.command.where()}: reads {path}: not shipped, not a known placeholder and not "
                             "written by an earlier command of the document (a misspelt path?)")
    if item.args.command == "compare" and not item.args.report_only:
        config = _norm(item.args.config)
        if config not in RUNNABLE_GRIDS:
            return f"the grid {config} takes minutes to hours; its config is loaded and checked"
        if config in grids_run:
            return f"{config} already ran once in this document (each run trains the grid again)"
        grids_run.add(config)
    return None


def _prepare_scratch(scratch: Path) -> None:
    scratch.mkdir()
    for name in ("data", "configs"):
        (scratch / name).symlink_to(ROOT / name, target_is_directory=True)
    for placeholder, shipped in STAND_INS.items():
        (scratch / placeholder).parent.mkdir(parents=True, exist_ok=True)
        (scratch / placeholder).symlink_to(ROOT / shipped, target_is_directory=True)


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_run_on_the_shipped_data(doc, tmp_path, monkeypatch, capsys, restore_logging):
    from moma.cli import main

    checked, problems = check_document((ROOT / doc).read_text(), doc)
    if problems:
        pytest.skip("the checks above fail first")
    scratch = tmp_path / "work"
    _prepare_scratch(scratch)
    monkeypatch.chdir(scratch)
    skipped_outputs: dict[str, str] = {}
    grids_run: set[str] = set()
    log = []
    for item in checked:
        reason = not_run_reason(item, scratch, skipped_outputs, grids_run)
        if reason:
            skipped_outputs.update({out: str(item.command.line) for out in item.outputs})
            log.append(f"not run {item.command.where()}: {reason}")
            continue
        argv = list(item.argv)
        if item.args.command in ("train", "distill") and not getattr(item.args, "resume", None):
            argv += TINY_RUN
        elif item.args.command == "compare" and not item.args.report_only:
            argv += tiny_compare_args(item.cfg)
        started = time.perf_counter()
        code = main(argv)
        seconds = time.perf_counter() - started
        captured = capsys.readouterr()
        tail = "\n".join((captured.out + captured.err).strip().splitlines()[-15:])
        assert code == 0, f"{item.command.where()} exits {code} (run as moma {' '.join(argv)}):\n{tail}"
        log.append(f"ran {item.command.where()} ({seconds:.1f} s)")
    print(f"{doc}:\n  " + "\n  ".join(log or ["no commands"]))  # shown with -s or -rP
    if doc == "README.md":  # the quick start and the deployment run end to end
        ran = " ".join(line for line in log if line.startswith("ran "))
        for expected in ("moma train configs/demo/teacher_lung.yaml", "moma distill configs/demo/teacher_lung.yaml",
                         "moma evaluate runs/my-student", "moma export runs/my-student", "moma predict student.onnx"):
            assert expected in ran, "\n".join(log)
