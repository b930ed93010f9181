"""What autopar accepts as input: one schema per input kind, and the checks that read it.

[Note: input schema] Every value a user hands autopar is checked against one
table here before any stage uses it: the fields autopar reads from a model's
``config.json`` (:data:`MODEL_CONFIG`), from a cluster JSON file
(:data:`CLUSTER`, docs/clusters.md), and the options of ``autopar explain``
and ``autopar run`` (:data:`EXPLAIN_OPTIONS`, :data:`RUN_OPTIONS`). A field
gives its type, its range and a sane upper bound with the reason for it;
:func:`check_fields` returns a :class:`Checked` mapping that raises a
``KeyError`` (a bug, caught by the tests) for a field not in the table, so a
field read later must be added here first, and tests/test_cli_corpus.py feeds
every field of every table a value of the wrong type. Upper bounds are there
so no loop over a user-given count runs unbounded; docs/errors.md lists them.
Text from files is printed through :func:`show`/:func:`escape_text` (no raw
control characters reach a terminal).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

from autopar.errors import AutoparError

MAX_GPUS = 2**20
"""The largest training clusters built have ~2 x 10**5 GPUs; 2**20 is 5x that.
The planner's work grows with the count's divisors, taken in O(sqrt(n))."""
MAX_GPUS_PER_NODE = 2**10
"""Nodes hold 8 GPUs (DGX) up to one 72-GPU NVLink domain (NVL72); 1024 leaves 14x."""
MAX_LAYERS = 2**8
"""The deepest published decoder LMs have ~128 blocks (Megatron 1T: 128, Llama-3
405B: 126); 256 is 2x that. Not 10**5: planning time grows faster than the
square of the layer count (the stage-split DP is O(layers^2) per solve), and on
this project's dev box 256 layers plan in <= 30 s on any GPU count up to 2**20,
512 layers take ~110 s on 1024 GPUs and 1024 layers over 5 minutes."""
MAX_HIDDEN = 2**20
"""Widest models are ~2**14-2**15 (GPT-3: 12288, Llama-3 405B: 16384); 2**20 is 64x."""
MAX_HEADS = 2**16
"""Models use up to 128 heads; a head narrower than 16 is not a head (2**20 / 16)."""
MAX_FFN = 2**22
"""Four times :data:`MAX_HIDDEN`, the GPT-2 convention for the MLP width."""
MAX_VOCAB = 2**24
"""The largest vocabularies are ~2**18 (Gemma: 256k); 2**24 is 64x."""
MAX_SEQ = 2**24
"""16M tokens per sequence: the longest contexts offered are 1-10M tokens."""
MAX_BATCH = 2**30
"""Sequences per step: GPT-3 used 1536; 2**30 is far past any run and still
cheap to factor (divisors in O(sqrt(n)) = 32768 steps)."""
MAX_FILE_BYTES = 10 * 2**20
"""A HF config.json is 1-100 KB, a cluster JSON under 1 KB; 10 MiB is read and
parsed in well under a second. Checked before reading."""
MAX_JSON_DEPTH = 32
"""HF configs nest 3-4 levels (text_config.rope_scaling); Python's parser
recurses once per level and would fail past ~1000."""
MAX_PATH_CHARS = 4096
"""Linux PATH_MAX."""
MAX_NAME_CHARS = 255
"""Linux NAME_MAX: longest file-name component."""
MAX_TEXT_CHARS = 256
"""Strings read from a config (model_type, architectures, names): HF repo ids
are at most 96 characters, class names ~40."""
MAX_LIST_ITEMS = 64
"""``architectures`` names one class in practice."""
SHOW_CHARS = 80
"""A bad value is shown (repr, escaped) up to this many characters."""


def escape_text(text: str) -> str:
    """``text`` with every non-printable character (controls, escapes, bidi marks, newlines) escaped."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def show(value: Any, limit: int = SHOW_CHARS) -> str:
    """A value as an error shows it: repr (so escaped), cut to ``limit`` characters."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<an integer of about {int(value.bit_length() * math.log10(2))} digits>"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, default=str)[: limit + 1]  # repr of a deep value could recurse
    else:
        text = repr(value)
    text = escape_text(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show_path(path, limit: int = SHOW_CHARS) -> str:
    """A path as an error shows it: like :func:`show`, but a long one keeps both ends (its file name is last)."""
    text = escape_text(repr(str(path)))
    if len(text) <= limit:
        return text
    tail = (limit - 3) // 2
    return text[: limit - 3 - tail] + "..." + text[-tail:]


# --- fields -----------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Field:
    """One input field: its type (``kind``), range and where it may be missing."""

    key: str
    """Name in the file, or the option's flag without ``--``."""
    kind: str
    """int, number, text, bool, texts, object, choice, ref, in_file, out_file, nnodes, endpoint, flag."""
    lo: float | None = None
    hi: float | None = None
    why: str = ""
    """Why the upper bound is what it is (one phrase, shown in the error)."""
    choices: tuple = ()
    required: bool = False
    default: Any = None
    aliases: tuple[str, ...] = ()
    """Older spellings read when ``key`` is absent (GPT-2's ``n_layer``)."""
    fields: tuple["Field", ...] = ()
    """An object's own fields."""
    if_missing: str = ""
    """How to fix the field's absence, where it is required."""
    flag: str = ""
    """The option as typed (``--json``); default ``--key-with-dashes``."""


class Checked(Mapping):
    """Values checked against a schema; asking for a field outside it is a bug."""

    def __init__(self, values: dict, paths: dict, where: str) -> None:
        self._values, self.paths, self.where = values, paths, where

    def __getitem__(self, key: str) -> Any:
        if key not in self._values:
            raise KeyError(f"{key!r} is read but not in the schema; add a Field for it in autopar/schema.py")
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


_JSON_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}
_HINTS = {"int": "a JSON integer such as 12 (no quotes, no decimal point)", "number": "a JSON number such as 0.5",
          "text": 'a JSON string such as "llama"', "bool": "true or false (no quotes)",
          "texts": 'a list of strings such as ["LlamaForCausalLM"]', "object": "a JSON object {...}"}


def _label(where: str, path: str, value: Any) -> str:
    """``where: path=value`` for a file's field, ``--flag value:`` for an option."""
    return f"{where}: {path}={show(value)}" if where else f"{path} {show(value)}:"


def _fail(where: str, path: str, value: Any, rest: str) -> AutoparError:
    return AutoparError(f"{_label(where, path, value)} {rest}")


def _constraint(f: Field) -> str:
    if f.kind == "int":
        return (f"a positive integer at most {f.hi:_}" if f.lo == 1
                else f"an integer from {f.lo:_} to {f.hi:_}").replace("_", ",")
    if f.kind == "number":
        return f"a finite number from {f.lo:g} to {f.hi:g}"
    if f.kind == "text":
        return f"a string of at most {MAX_TEXT_CHARS} characters"
    if f.kind == "texts":
        return f"a list of at most {MAX_LIST_ITEMS} strings"
    return {"bool": "true or false", "object": "a JSON object"}.get(f.kind, f.kind)


def _wrong_type(f: Field, value: Any, where: str, path: str) -> AutoparError:
    got = _JSON_KINDS.get(type(value), type(value).__name__)
    return _fail(where, path, value, f"must be {_constraint(f)}, not {got}; "
                 f"write {path} as {_HINTS.get(f.kind, _constraint(f))}")


def _check_range(f: Field, value: int | float, where: str, path: str) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):  # an int may pass 1e308: compared exactly
        raise _fail(where, path, value, f"must be {_constraint(f)}, not {value}; "
                    "use a finite number (JSON has no NaN or Infinity)")
    if value < f.lo:
        raise _fail(where, path, value, f"must be {_constraint(f)}; use at least {f.lo:g}")
    if value > f.hi:
        why = f" ({f.why})" if f.why else ""
        raise _fail(where, path, value, f"must be {_constraint(f)}{why}; use a smaller value")
    return value


def _check_int(f: Field, value: Any, where: str, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(f, value, where, path)
    return int(_check_range(f, value, where, path))


def _check_number(f: Field, value: Any, where: str, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(f, value, where, path)
    return float(_check_range(f, value, where, path))


def _check_text(f: Field, value: Any, where: str, path: str) -> str:
    if not isinstance(value, str):
        raise _wrong_type(f, value, where, path)
    if len(value) > MAX_TEXT_CHARS:
        raise _fail(where, path, value, f"has {len(value)} characters, more than {MAX_TEXT_CHARS}; use a shorter one")
    return value


def _check_texts(f: Field, value: Any, where: str, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_LIST_ITEMS:
        raise _wrong_type(f, value, where, path)
    item = Field(key=f.key, kind="text")
    return tuple(_check_text(item, v, where, f"{path}[{i}]") for i, v in enumerate(value))


def _check_bool(f: Field, value: Any, where: str, path: str) -> bool:
    if not isinstance(value, bool):
        raise _wrong_type(f, value, where, path)
    return value


def _check_choice(f: Field, value: Any, where: str, path: str) -> Any:
    if isinstance(value, bool) or value not in f.choices or type(value) is not type(f.choices[0]):
        names = [str(c) for c in f.choices]
        why = f" ({f.why})" if f.why else ""
        raise _fail(where, path, value, f"use {', '.join(names[:-1])} or {names[-1]}{why}")
    return value


def _check_object(f: Field, value: Any, where: str, path: str) -> Checked:
    if not isinstance(value, dict):
        raise _wrong_type(f, value, where, path)
    return check_fields(value, f.fields, where, prefix=f"{path}.")


_CHECKERS: dict[str, Callable[[Field, Any, str, str], Any]] = {
    "int": _check_int, "number": _check_number, "text": _check_text, "texts": _check_texts,
    "bool": _check_bool, "choice": _check_choice, "object": _check_object,
}


def _lookup(data: dict, f: Field) -> tuple[str, Any]:
    for key in (f.key, *f.aliases):
        if data.get(key) is not None:
            return key, data[key]
    return f.key, None


def check_fields(data: Any, fields: tuple[Field, ...], where: str, prefix: str = "") -> Checked:
    """Check the schema's ``fields`` of a JSON object (unknown keys are ignored, as HF configs have many).

    A field that is absent or null takes its default, or is refused when required.

    Raises:
        AutoparError: the first bad field, named by its dotted path, with its value, the rule and the fix.
    """
    if not isinstance(data, dict):
        got = _JSON_KINDS.get(type(data), type(data).__name__)
        raise AutoparError(f"{where}: the top level is {got}, not a JSON object; write the file as {{...}} "
                           "with the documented fields")
    values, paths = {}, {}
    for f in fields:
        key, value = _lookup(data, f)
        path = prefix + key
        paths[f.key] = path
        if value is None:
            if f.required:
                names = " or ".join(repr(prefix + k) for k in (f.key, *f.aliases))
                raise AutoparError(f"{where}: missing {names}; {f.if_missing or f'add {path} as {_constraint(f)}'}")
            values[f.key] = f.default
            continue
        values[f.key] = _CHECKERS[f.kind](f, value, where, path)
    return Checked(values, paths, where)


# --- paths and files -----------------------------------------------------------

def check_path_text(text: str, what: str) -> Path:
    """A path as typed: no NUL, at most PATH_MAX characters and NAME_MAX per component."""
    if "\0" in text:
        raise AutoparError(f"{what} {show(text)} contains a NUL character; pass a real path")
    if len(text) > MAX_PATH_CHARS:
        raise AutoparError(f"{what} {show(text)} is {len(text)} characters long, more than PATH_MAX "
                           f"{MAX_PATH_CHARS}; use a shorter path")
    longest = max(text.split("/"), key=len)
    if len(longest.encode("utf-8", "surrogateescape")) > MAX_NAME_CHARS:
        raise AutoparError(f"{what} {show(text)} has a component of {len(longest)} characters, more than "
                           f"NAME_MAX {MAX_NAME_CHARS}; use shorter names")
    return Path(text)


def _regular_file(path: Path, what: str) -> os.stat_result:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise AutoparError(f"{what} {show(str(path))} does not exist; pass an existing file") from None
    except OSError as err:
        raise AutoparError(f"{what} {show(str(path))} cannot be opened ({err.strerror}); "
                           "fix the path or its permissions") from None
    if stat.S_ISDIR(info.st_mode):
        raise AutoparError(f"{what} {show(str(path))} is a directory; pass a file")
    if not stat.S_ISREG(info.st_mode):
        raise AutoparError(f"{what} {show(str(path))} is not a regular file (a device or pipe); pass a file")
    return info


def check_readable_file(path: Path, what: str) -> Path:
    """An existing regular file this process may read."""
    _regular_file(path, what)
    if not os.access(path, os.R_OK):
        raise AutoparError(f"{what} {show(str(path))} is not readable; fix its permissions (chmod +r)")
    return path


def read_text_capped(path: Path, what: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of ``path``, refusing more than ``max_bytes`` before reading them."""
    info = _regular_file(path, what)
    if info.st_size > max_bytes:
        raise AutoparError(f"{what} {show(str(path))} is {info.st_size:,} bytes, more than the {max_bytes:,} "
                           "allowed; pass the real config.json (a few KB)")
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as err:
        raise AutoparError(f"{what} {show(str(path))} cannot be read ({err.strerror}); "
                           "fix its permissions") from None
    if len(data) > max_bytes:  # grew, or a file whose size stat does not know
        raise AutoparError(f"{what} {show(str(path))} is more than {max_bytes:,} bytes; pass the real file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise AutoparError(f"{what} {show(str(path))} is not UTF-8 (byte {data[err.start]:#04x} at offset "
                           f"{err.start}); save it as UTF-8 JSON") from None


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
"""A JSON string, or an unterminated one to the end: every match attempt at a quote succeeds
without backtracking, so the scan is linear even on hostile input (no retry from each quote)."""
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` outside strings (linear, no recursion)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub('""', text))
    opens = brackets.count("[") + brackets.count("{")
    if opens <= MAX_JSON_DEPTH:  # no deeper than its number of openings
        return opens
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def load_json_file(path: Path, what: str) -> Any:
    """Parse a JSON file within the size and depth caps.

    Raises:
        AutoparError: missing, not a file, unreadable, too big, not UTF-8, too deep or malformed.
    """
    text = read_text_capped(path, what)
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise AutoparError(f"{what} {show(str(path))} nests {depth} levels deep, more than {MAX_JSON_DEPTH}; "
                           "pass the real config (HF configs nest 3-4 levels)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise AutoparError(f"malformed {what} {show(str(path))}: {err.msg} at line {err.lineno} column "
                           f"{err.colno}; fix the JSON") from None
    except ValueError as err:  # json's only other error: an integer past Python's digit limit
        raise AutoparError(f"malformed {what} {show(str(path))}: {show(str(err), 60)}; "
                           "use numbers of a sane size") from None


def check_out_file(path: Path, flag: str, suffixes: tuple[str, ...]) -> Path:
    """A file we may create: right suffix, its folder exists and takes a new file (probed, not guessed)."""
    if path.suffix.lower() not in suffixes:
        raise AutoparError(f"{flag} {show_path(path)}: use a {' or '.join(suffixes)} file name")
    parent = path.parent
    if not os.path.isdir(parent):
        state = "is not a folder" if os.path.lexists(parent) else "does not exist"
        raise AutoparError(f"{flag} {show_path(path)}: {show_path(parent)} {state}; "
                           "create the folder or pick another one")
    if os.path.isdir(path) or (os.path.lexists(path) and not os.access(path, os.W_OK)):
        raise AutoparError(f"{flag} {show_path(path)}: exists and cannot be overwritten; pick another file name")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".autopar-probe-"):
            pass
    except OSError as err:
        raise AutoparError(f"{flag} {show_path(path)}: cannot write in {show_path(parent)} ({err.strerror}); "
                           "pick a writable folder") from None
    return path


# --- option kinds ------------------------------------------------------------

_ENDPOINT = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])"
                       r"(?::(?P<port>[0-9]{1,5}))?")
"""torchrun's HOST[:PORT]: a host name or IPv4 address, or an IPv6 address in brackets."""


def _check_ref(f: Field, value: Any, where: str, path: str) -> Any:
    if not isinstance(value, str):
        raise _wrong_type(f, value, where, path)
    check_path_text(value, path)
    return value


def _check_in_file(f: Field, value: Any, where: str, path: str) -> Path:
    return check_readable_file(check_path_text(str(value), path), path)


def _check_out_file(f: Field, value: Any, where: str, path: str) -> Path:
    return check_out_file(check_path_text(str(value), path), path, f.choices)


def parse_nnodes(text: str, flag: str = "--nnodes") -> tuple[int, int]:
    """torchrun's ``N`` or ``MIN:MAX`` node counts, each in [1, MAX_GPUS]."""
    parts = text.split(":")
    if len(parts) > 2 or not all(p.isascii() and p.isdigit() and len(p) <= 7 for p in parts):
        raise AutoparError(f"{flag} {show(text)}: must be N or MIN:MAX, positive integers at most {MAX_GPUS:,}; "
                           "use e.g. --nnodes 2 or --nnodes 1:4")
    low, high = int(parts[0]), int(parts[-1])
    if not 1 <= low <= high <= MAX_GPUS:
        raise AutoparError(f"{flag} {show(text)}: needs 1 <= MIN <= MAX <= {MAX_GPUS:,}; use e.g. --nnodes 2")
    return low, high


def _check_nnodes(f: Field, value: Any, where: str, path: str) -> tuple[int, int]:
    return parse_nnodes(str(value), path)


def _check_endpoint(f: Field, value: Any, where: str, path: str) -> str:
    match = _ENDPOINT.fullmatch(str(value))
    if match is None or (match["port"] is not None and not 1 <= int(match["port"]) <= 65535):
        raise _fail(where, path, value, "must be HOST:PORT (a host name or address, a port from 1 to 65535); "
                    "use e.g. --rdzv-endpoint node0:29400")
    return str(value)


def _check_flag(f: Field, value: Any, where: str, path: str) -> Any:
    return value  # a bool or an Enum member: click has checked it


_CHECKERS.update({"ref": _check_ref, "in_file": _check_in_file, "out_file": _check_out_file,
                  "nnodes": _check_nnodes, "endpoint": _check_endpoint, "flag": _check_flag})


def check_options(values: Mapping[str, Any], fields: tuple[Field, ...]) -> Checked:
    """Check a command's parsed options against its schema; every option must have a Field.

    Raises:
        KeyError: an option with no Field (a bug: add it to the schema).
        AutoparError: the first bad option, with the flag, the value, the rule and the fix.
    """
    by_key = {f.key: f for f in fields}
    out, paths = {}, {}
    for key, value in values.items():
        f = by_key[key]
        flag = f.flag or "--" + key.replace("_", "-")
        paths[key] = flag
        out[key] = value if value is None else _CHECKERS[f.kind](f, value, "", flag)
    return Checked(out, paths, "")


# --- the schemas ---------------------------------------------------------------

def _int(key: str, hi: int, why: str, lo: int = 1, **kw) -> Field:
    return Field(key=key, kind="int", lo=lo, hi=hi, why=why, **kw)


def _fraction(key: str, lo: float = 0.0) -> Field:
    return Field(key=key, kind="number", lo=lo, hi=1.0, why="a probability or fraction")


_NEEDED = "add it (every causal-LM config.json has it)"
_GPUS_WHY = "2**20, 5x the largest clusters built"
_LAYERS_WHY = "2**8, 2x the deepest published LMs; planning time grows with its square"

MODEL_TYPE = Field(key="model_type", kind="text", required=True,
                   if_missing='set model_type to a supported family such as "llama" (a HF config.json has it)')
"""Read first: an unsupported model is named as such before its other fields are judged."""
MODEL_NAME = Field(key="_autopar_name", kind="text")
"""The display name a preset gives itself."""

MODEL_CONFIG: tuple[Field, ...] = (
    MODEL_TYPE,
    MODEL_NAME,
    _int("num_hidden_layers", MAX_LAYERS, _LAYERS_WHY, aliases=("n_layer", "n_layers"), required=True,
         if_missing=_NEEDED),
    _int("hidden_size", MAX_HIDDEN, "2**20, 64x the widest models", aliases=("n_embd", "n_embed", "d_model"),
         required=True, if_missing=_NEEDED),
    _int("num_attention_heads", MAX_HEADS, "2**16: heads of at least 16 wide in 2**20",
         aliases=("n_head", "n_heads"), required=True, if_missing=_NEEDED),
    _int("num_key_value_heads", MAX_HEADS, "2**16, as num_attention_heads"),
    _int("num_kv_heads", MAX_HEADS, "2**16, as num_attention_heads"),
    _int("head_dim", MAX_HIDDEN, "2**20, as hidden_size"),
    _int("vocab_size", MAX_VOCAB, "2**24, 64x the largest vocabularies", required=True,
         if_missing=_NEEDED),
    _int("max_position_embeddings", MAX_SEQ, "2**24 tokens, past the longest contexts",
         aliases=("n_positions", "max_seq_len"), default=2048),
    *(_int(key, MAX_FFN, "2**22, 4x the largest hidden size") for key in ("intermediate_size", "n_inner",
                                                                          "ffn_dim", "ffn_hidden_size")),
    _int("word_embed_proj_dim", MAX_HIDDEN, "2**20, as hidden_size"),
    _int("expansion_ratio", 64, "64; MLPs are 2-8x the hidden size"),
    _int("num_ln_in_parallel_attn", 2, "Falcon has 1 or 2 norms per parallel block"),
    *(Field(key=key, kind="text") for key in ("activation_function", "hidden_act", "hidden_activation",
                                             "activation")),
    *(_fraction(key) for key in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout",
                                 "hidden_dropout", "dropout", "residual_dropout", "embedding_dropout")),
    _fraction("rotary_pct", lo=1e-6),
    _fraction("partial_rotary_factor", lo=1e-6),
    *(Field(key=key, kind="number", lo=1e-6, hi=1e6, why="caps are tens (Gemma 2: 50 and 30)")
      for key in ("attn_logit_softcapping", "final_logit_softcapping")),
    Field(key="rope_parameters", kind="object", fields=(_fraction("partial_rotary_factor", lo=1e-6),)),
    Field(key="attn_config", kind="object", fields=(
        _fraction("attn_pdrop"), Field(key="attn_type", kind="text"),
        *(Field(key=key, kind="bool") for key in ("alibi", "qk_ln")))),
    Field(key="architectures", kind="texts", default=()),
    *(Field(key=key, kind="bool") for key in (
        "tie_word_embeddings", "attention_bias", "mlp_bias", "use_parallel_residual", "use_bias", "bias",
        "enable_bias", "no_bias", "multi_query", "new_decoder_architecture", "parallel_attn", "alibi",
        "do_layer_norm_before", "layer_norm_elementwise_affine")),
)
"""The fields of a HF ``config.json`` that autopar reads (autopar.profile.config, analytic). Families
name the same thing differently (MPT's ``d_model``, Falcon's ``num_kv_heads``, OPT's ``ffn_dim``); each
spelling is checked, and autopar.profile.config reads the one its family uses."""


def _positive(key: str, lo: float, hi: float, why: str, **kw) -> Field:
    return Field(key=key, kind="number", lo=lo, hi=hi, why=why, **kw)


_CLUSTER_FIX = "see docs/clusters.md for the fields"

CLUSTER_DEVICE: tuple[Field, ...] = (
    Field(key="name", kind="text", default="gpu"),
    _positive("peak_tflops", 1e-3, 1e6, "1 EFLOP/s per device; an H200 does 989 TFLOP/s", required=True,
              if_missing=f"add device.peak_tflops; {_CLUSTER_FIX}"),
    _positive("memory_gib", 1e-3, 2.0**16, "64 TiB per device; an H200 has 141 GB", required=True,
              if_missing=f"add device.memory_gib; {_CLUSTER_FIX}"),
    _positive("hbm_TBps", 1e-3, 1e3, "1 PB/s; an H200 does 4.8 TB/s", default=2.0),
    _positive("context_gib", 1e-3, 2.0**16, "as memory_gib", default=1.0),
    _int("sm_count", 2**16, "2**16; an H100 has 132"),
    _positive("matmul_ceiling", 1e-3, 1.0, "a fraction of peak_tflops: a matmul cannot beat the peak", default=0.8),
    _positive("attention_ceiling", 1e-3, 1.0, "a fraction of peak_tflops", default=0.5),
    _positive("loss_TBps", 1e-9, 1e3, "1 PB/s: the LM head's loss kernels' measured rate (autopar calibrate)"),
    _positive("loss_parallel_TBps", 1e-9, 1e3,
              "1 PB/s: the vocab-parallel loss's measured rate under tensor parallelism (autopar calibrate)"),
    _positive("fresh_pages_GBps", 1e-6, 1e6,
              "1 PB/s: the rate a CPU rank maps in fresh pages, measured by autopar calibrate (absent: not priced)"),
    _positive("optimizer_TBps", 1e-9, 1e3,
              "1 PB/s: torch's AdamW step's measured rate over its counted traffic (autopar calibrate; absent: "
              "hbm_TBps)"),
    Field(key="kind", kind="choice", choices=("gpu", "cpu"), default="gpu",
          why="a GPU, or a host's cores shared by gloo processes (autopar calibrate on a CPU)"),
)

CLUSTER: tuple[Field, ...] = (
    _int("nodes", MAX_GPUS, _GPUS_WHY, default=1),
    _int("gpus_per_node", MAX_GPUS_PER_NODE, "2**10, 14x an NVL72 domain", default=1),
    Field(key="device", kind="object", fields=CLUSTER_DEVICE, required=True,
          if_missing=f'add "device": {{"peak_tflops": ..., "memory_gib": ...}}; {_CLUSTER_FIX}'),
    _positive("intra_node_GBps", 1e-3, 1e6, "1 PB/s per GPU; NVLink4 is 450 GB/s", required=True,
              if_missing=f"add intra_node_GBps; {_CLUSTER_FIX}"),
    _positive("inter_node_GBps", 1e-3, 1e6, "1 PB/s per GPU; NDR is 50 GB/s", required=True,
              if_missing=f"add inter_node_GBps; {_CLUSTER_FIX}"),
    _positive("intra_node_latency_us", 1e-3, 1e6, "one second", default=5.0),
    _positive("inter_node_latency_us", 1e-3, 1e6, "one second", default=10.0),
    _int("nics_per_node", MAX_GPUS_PER_NODE, "as gpus_per_node"),
)
"""A cluster JSON file (docs/clusters.md)."""

EXPLAIN_OPTIONS: tuple[Field, ...] = (
    Field(key="model", kind="ref", flag="MODEL"),
    Field(key="cluster", kind="ref"),
    _int("gpus", MAX_GPUS, _GPUS_WHY),
    _int("nodes", MAX_GPUS, _GPUS_WHY),
    _int("gpus_per_node", MAX_GPUS_PER_NODE, "2**10, 14x an NVL72 domain"),
    _int("global_batch", MAX_BATCH, "2**30 sequences, far past any run"),
    _int("seq_len", MAX_SEQ, "2**24 tokens, past the longest contexts"),
    _int("tp", MAX_GPUS, _GPUS_WHY),
    _int("pp", MAX_LAYERS, "at most one stage per layer: " + _LAYERS_WHY),
    _int("dp", MAX_GPUS, _GPUS_WHY),
    _int("micro_batch", MAX_BATCH, "2**30 sequences, as --global-batch"),
    _int("virtual_stages", MAX_LAYERS, "at most one chunk per layer"),
    Field(key="zero", kind="choice", choices=(0, 2, 3),
          why="ZeRO stages autopar runs: 0 replicated, 2 and 3 FSDP2; 1, the optimizer state sharded alone, is "
              "not run: use 2"),
    Field(key="split_solver", kind="choice", choices=("auto", "highs", "cbc", "dp")),
    Field(key="plot", kind="out_file", choices=(".png", ".svg")),
    Field(key="memory_headroom", kind="number", lo=0.0, hi=1.0, why="a fraction of device memory; below 1"),
    *(Field(key=key, kind="flag") for key in ("schedule", "recompute", "sequence_parallel", "tp_across_nodes",
                                             "profiler", "attention", "alternatives", "measure", "precision",
                                             "from_env")),
    Field(key="json_out", kind="flag", flag="--json"),
)
"""Options of ``autopar explain`` (enums and bools are checked by click: kind ``flag``)."""

RUN_OPTIONS: tuple[Field, ...] = (
    Field(key="script", kind="in_file", flag="SCRIPT"),
    _int("nproc", MAX_GPUS_PER_NODE, "2**10 processes, as GPUs per node", flag="-n"),
    Field(key="nnodes", kind="nnodes"),
    _int("node_rank", MAX_GPUS - 1, "below the node count", lo=0),
    Field(key="rdzv_endpoint", kind="endpoint"),
    Field(key="rdzv_id", kind="text"),
)
"""Options of ``autopar run`` (the rest of the command line goes to the script)."""
