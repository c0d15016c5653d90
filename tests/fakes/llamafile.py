"""Build a llamafile-format file for tests (a real llamafile cannot be downloaded here).

The file has a real llamafile's outer shape:

* It starts with ``MZqFpD='`` like an APE (Actually Portable Executable) launcher, so
  ``sh FILE ...`` runs it and ``execve(FILE)`` fails with ENOEXEC, exactly as a real
  llamafile does on a Linux without APE binfmt (routerd must launch it through ``sh``).
* A ZIP is appended behind the launcher. Its central directory carries absolute offsets
  (as ``zip -A`` leaves them), so ``zipfile``, ``unzip -l`` and routerd's reader all open
  it. It holds the GGUF **STORED** (uncompressed) with its data aligned to 4096 bytes
  through a zipalign-style (0xD935) extra field, so it can be mmapped at an offset, and
  ``.args``: llamafile's default arguments, one per line, ``...`` marking where the
  command line's arguments go.

What differs from a real llamafile: the real one is one APE binary with the llama.cpp
engine compiled inside and mmaps the GGUF straight out of its own ZIP. Here the launcher
is a shell script that ``exec``s a Python snippet (the interpreter path baked in at build
time), which reads ``.args``, extracts the GGUF once to ``$TMPDIR`` (cached by the
member's CRC-32 and size, since llama-server cannot read at an offset), drops
llamafile-only flags (``--server``, ``--nobrowser``, ``--gpu X``, ...), rewrites the model
member name (``name.gguf`` or ``/zip/name.gguf``) to the extracted path, merges the
arguments and ``exec``s the llama-server given at build time. Both steps are ``exec``, so
the process routerd supervises *is* llama-server: same pid, no orphan shell. Like a real
llamafile it refuses to run without ``--server`` (a real one would start its chat UI
and never bind the port).
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import struct
import sys
import zipfile
from pathlib import Path

ALIGN = 4096
_ZIPALIGN_EXTRA_ID = 0xD935

# Runs as `python -c LAUNCHER <llamafile> <llama-server> <cli args...>`.
LAUNCHER = r"""
import os, shutil, sys, tempfile, zipfile
exe, server, cli = sys.argv[1], sys.argv[2], sys.argv[3:]
if "--server" not in cli:
    sys.exit("fake llamafile: only --server mode is implemented")
switches = {"--server", "--nobrowser", "--fast", "--precise", "--trap", "--unsecure",
            "--recompile", "--nocompile", "--tinyblas", "--iq"}
valued = {"--gpu"}
kept, skip = [], False
for a in cli:
    if skip:
        skip = False
    elif a in valued:
        skip = True
    elif a not in switches:
        kept.append(a)
with zipfile.ZipFile(exe) as zf:
    try:
        text = zf.read(".args").decode("utf-8")
    except KeyError:
        text = ""
    base = [s.strip("\r") for s in text.split("\n") if s.strip()]
    member = next(i for i in zf.infolist() if i.filename.endswith(".gguf"))
    root = os.environ.get("TMPDIR") or tempfile.gettempdir()
    cache = os.path.join(root, "fake-llamafile-%08x-%d" % (member.CRC, member.file_size))
    os.makedirs(cache, exist_ok=True)
    model = os.path.join(cache, os.path.basename(member.filename))
    if not os.path.exists(model) or os.path.getsize(model) != member.file_size:
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".part")
        with os.fdopen(fd, "wb") as out, zf.open(member) as src:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, model)
if "..." in base:
    i = base.index("...")
    merged = base[:i] + kept + base[i + 1:]
else:
    merged = base + kept
names = {member.filename, "/zip/" + member.filename}
merged = [model if a in names else a for a in merged]
sys.stderr.write("fake llamafile: exec %s %s\n" % (server, " ".join(merged)))
sys.stderr.flush()
os.execv(server, [server] + merged)
"""


def default_args(gguf: Path) -> list[str]:
    """The .args a llamafile build typically embeds."""
    return ["-m", gguf.name, "--ctx-size", "2048", "..."]


def launcher_script(llama_server: Path, python: Path) -> bytes:
    """The APE-like sh prologue that execs the Python launcher."""
    lines = [
        "MZqFpD='",
        "fake llamafile (routerd tests): sh launcher + ZIP holding the GGUF STORED and .args",
        "'",
        f"exec {shlex.quote(str(python))} -c {shlex.quote(LAUNCHER)}"
        f" \"$0\" {shlex.quote(str(llama_server))} \"$@\"",
        "exit 127",
        "",
    ]
    return "\n".join(lines).encode()


def _alignment_extra(header_offset: int, name: str) -> bytes:
    """A zipalign-style extra field that puts the member's data on an ALIGN boundary."""
    fixed = 30 + len(name.encode()) + 6  # local header, name, extra id/size/alignment
    pad = (-(header_offset + fixed)) % ALIGN
    return struct.pack("<HHH", _ZIPALIGN_EXTRA_ID, 2 + pad, ALIGN) + b"\0" * pad


def build_llamafile(
    gguf: Path,
    dest: Path,
    *,
    args: list[str] | None = None,
    llama_server: Path,
    python: Path | None = None,
) -> Path:
    """Write an executable llamafile-format file at ``dest`` and return ``dest``.

    ``args`` become the embedded ``.args`` (default: ``-m <gguf name> --ctx-size 2048 ...``);
    ``llama_server`` is exec'd by the launcher; ``python`` runs the launcher snippet
    (default: this interpreter)."""
    gguf, dest = Path(gguf), Path(dest)
    lines = default_args(gguf) if args is None else list(args)
    with open(dest, "wb") as f:
        f.write(launcher_script(Path(llama_server), Path(python or sys.executable)))
        with zipfile.ZipFile(f, "w") as zf:
            zf.writestr(".args", "".join(f"{a}\n" for a in lines), zipfile.ZIP_STORED)
            info = zipfile.ZipInfo.from_file(gguf, gguf.name)
            info.compress_type = zipfile.ZIP_STORED
            info.extra = _alignment_extra(f.tell(), gguf.name)
            with open(gguf, "rb") as src, zf.open(info, "w") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    mode = dest.stat().st_mode
    os.chmod(dest, mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return dest


def gguf_data_offset(llamafile: Path) -> tuple[int, int]:
    """(absolute offset, size) of the GGUF member's data, read from the local header."""
    with zipfile.ZipFile(llamafile) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(".gguf"))
    with open(llamafile, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size
