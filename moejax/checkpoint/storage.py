"""Storage failures as one line: what is wrong on disk (a missing, unreadable, truncated or damaged
file) becomes a `UserError` naming the file and the reason; anything else propagates as the bug it is."""

from __future__ import annotations

import json
import os
import re
import sys

from moejax.errors import UserError, os_reason


def read_error(e: BaseException, where: str, params_dir: str) -> UserError | None:
    """restore's one line for an unreadable tensor, naming its data file(s); None for a bug."""
    reason = storage_reason(e)
    if reason is None:
        return None
    m = re.search(r'Error reading "([^/"]+)/', reason)
    files = [f if os.path.exists(f) else f"{f}, which is missing"
             for f in (data_files(params_dir, {m.group(1)}) if m else [])]
    reason += f" (data file {', '.join(files)})" if files else ""
    m = _STATUS.search(reason)
    kind = {"OUT_OF_RANGE": "truncated", "DATA_LOSS": "damaged", "NOT_FOUND": "missing",
            "PERMISSION_DENIED": "permission denied"}.get(m.group(1) if m else "", "")
    kind = kind or ("truncated or missing" if "Truncated" in reason else "damaged" if "corrupt" in reason.lower() else "")
    return UserError(f"{where}: parameters unreadable{f' ({kind})' if kind else ''}: {reason}")


def data_files(params_dir: str, names: set) -> list:
    """The OCDBT data files that hold the chunks of tensors `names`, read from the b-tree; [] when
    that cannot be worked out (the message then names the directory)."""
    try:
        import tensorstore as ts
        from tensorstore import ocdbt

        base = ts.KvStore.open("file://" + params_dir.rstrip("/") + "/").result()
        top = ocdbt.dump(base).result()
        todo = [v["root"]["location"] for v in top.get("versions", [])[-1:] if "location" in v.get("root", {})]
        files = set()
        while todo:
            node = ocdbt.dump(base, todo.pop()).result()
            for e in node.get("entries", []):
                todo += [v for v in e.values() if isinstance(v, str) and v.startswith("btreenode::")]
                key = e.get("key", b"")
                key = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
                ref = e.get("indirect_value")
                if isinstance(ref, str) and ref.startswith("value:") and key.split("/")[0] in names:
                    _, prefix, rest = ref.split(":", 2)  # value:ocdbt.process_0/:d/<file>:<offset>:<length>
                    files.add(os.path.join(params_dir, prefix + rest.rsplit(":", 2)[0]))
        return sorted(files)
    except Exception:  # only a diagnostic: any failure to work it out falls back to the directory
        return []


_STATUS = re.compile(r"\b(OUT_OF_RANGE|FAILED_PRECONDITION|DATA_LOSS|NOT_FOUND|PERMISSION_DENIED|UNAVAILABLE|"
                     r"RESOURCE_EXHAUSTED|ABORTED): ")


def storage_reason(e: BaseException) -> str | None:
    """One line for a storage failure anywhere in `e`'s chain (an OSError, a TensorStore status
    that means missing, unreadable, truncated or damaged data, undecodable metadata), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return os_reason(e, "?")
        if isinstance(e, json.JSONDecodeError):
            return f"metadata is not valid JSON ({e}): truncated or damaged"
        m = _STATUS.search(str(e)) if isinstance(e, ValueError) else None
        if m:
            text = str(e)[m.start():].split(" [tensorstore_spec")[0].split(" [source locations")[0]
            return " ".join(text.split())[:400]
        e = e.__cause__ or e.__context__
    return None


def drop_closed_loop_noise() -> None:
    """After a failed read, orbax's storage callbacks still post to its closed asyncio loop and
    Python prints each 'RuntimeError: Event loop is closed' through sys.unraisablehook, around the
    real error. Drop exactly those; every other unraisable exception goes to the previous hook."""
    prev = sys.unraisablehook
    if getattr(prev, "_moejax", False):
        return

    def hook(u):
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        prev(u)

    hook._moejax = True
    sys.unraisablehook = hook
