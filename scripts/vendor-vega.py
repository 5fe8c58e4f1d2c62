#!/usr/bin/env python3
"""Build infra/plots/template.html: DVC's plots page with Vega, Vega-Lite and vega-embed inline.

`dvc plots show` writes a page that loads the three libraries from the network by
default, a blank page without internet. This page carries them inline, so
dvc_plots/index.html opens offline (.dvc/config: plots.html_template points here).

    python scripts/vendor-vega.py           # regenerate from the pinned npm packages (needs npm)
    python scripts/vendor-vega.py --check   # verify the committed page against the lock (Python only)
    python scripts/vendor-vega.py --update  # after changing PINS: rewrite the lock from what npm gives

Regenerating runs `npm pack <name>@<version>` for the exact versions below, checks each
tarball's sha512 against the registry's integrity value and the lock
(infra/plots/vega.lock.json), and refuses a mismatch. The page's header comment and
the lock record the versions, the tarballs' sha512 and each inlined file's sha256;
`--check` recomputes the sha256 of every inlined block, so a hand edit is caught.
The libraries' BSD-3-Clause notices are kept in the page.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "infra" / "plots" / "template.html"
LOCK = ROOT / "infra" / "plots" / "vega.lock.json"

# name -> (exact version, file of the tarball that is inlined); order = load order
PINS: dict[str, tuple[str, str]] = {
    "vega": ("5.33.1", "package/build/vega.min.js"),
    "vega-lite": ("5.23.0", "package/build/vega-lite.min.js"),
    "vega-embed": ("6.29.0", "package/build/vega-embed.min.js"),
}

# vega's npm tarball ships no LICENSE file; this is the notice of its repository (github.com/vega/vega, LICENSE).
VEGA_COPYRIGHT = "Copyright (c) 2015-2023, University of Washington Interactive Data Lab\nAll rights reserved."
BSD3_BODY = """\
Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

3. Neither the name of the copyright holder nor the names of its contributors
   may be used to endorse or promote products derived from this software
   without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE."""

# The editor action opens vega.github.io (a network page): off; export / source stay.
EMBED_DEFAULTS = """\
(function () {
  var embed = window.vegaEmbed;
  window.vegaEmbed = function (el, spec, opt) {
    return embed(el, spec, Object.assign({actions: {export: true, source: true, compiled: true, editor: false}}, opt || {}));
  };
})();"""

STYLE = """\
    body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 16px; color: #222; }
    header { font-size: 13px; color: #555; margin-bottom: 8px; }
    main { display: flex; flex-wrap: wrap; gap: 12px 20px; align-items: flex-start; }
    table { border-spacing: 15px; }"""

BLOCK = re.compile(r'<script data-package="(?P<name>[a-z-]+)@(?P<version>[0-9.]+)" data-sha256="(?P<sha>[0-9a-f]{64})">'
                   r"\n(?P<body>.*?)\n</script>", re.S)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha512_integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def npm_pack(name: str, version: str, folder: Path) -> tuple[bytes, str]:
    """(tarball bytes, the registry's integrity value) of name@version."""
    out = subprocess.run(["npm", "pack", f"{name}@{version}", "--json", "--pack-destination", str(folder)],
                         check=True, capture_output=True, text=True).stdout
    info = json.loads(out)[0]
    if info["version"] != version:
        sys.exit(f"vendor-vega: npm gave {name}@{info['version']}, not {version}")
    return (folder / info["filename"]).read_bytes(), info["integrity"]


def licence(name: str, files: dict[str, bytes]) -> str:
    if name == "vega":
        return f"{VEGA_COPYRIGHT}\n\n{BSD3_BODY}"
    return files["package/LICENSE"].decode().strip()


def fetch(lock: dict | None) -> tuple[dict, dict[str, bytes], dict[str, str]]:
    """Pack every pin; returns (lock entries, inlined file bytes, licence texts); refuses a mismatch."""
    entries, code, notices = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (version, member) in PINS.items():
            tarball, integrity = npm_pack(name, version, Path(tmp))
            if sha512_integrity(tarball) != integrity:
                sys.exit(f"vendor-vega: {name}@{version}: tarball sha512 differs from the registry's integrity")
            with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
                wanted = {member, "package/LICENSE"}
                files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name in wanted}
            entries[name] = {"version": version, "file": member.removeprefix("package/"), "integrity": integrity,
                             "sha256": sha256(files[member]), "license": "BSD-3-Clause"}
            code[name] = files[member]
            notices[name] = licence(name, files)
            if lock is not None and lock.get(name) != entries[name]:
                sys.exit(f"vendor-vega: {name}@{version} differs from {LOCK.relative_to(ROOT)} "
                         f"(lock: {lock.get(name)}, now: {entries[name]}); --update if the pins changed on purpose")
    return entries, code, notices


def render(entries: dict, code: dict[str, bytes], notices: dict[str, str]) -> str:
    header = ["Generated by scripts/vendor-vega.py from pinned npm packages; do not edit by hand.",
              "The DVC plots page of this project (.dvc/config: plots.html_template): Vega, Vega-Lite and",
              "vega-embed are inline, so the page needs no network. DVC fills the plot_divs placeholder.", ""]
    for name, e in entries.items():
        header += [f"{name} {e['version']} ({e['file']}, {e['license']})",
                   f"  npm tarball {e['integrity']}", f"  inlined file sha256 {e['sha256']}"]
    header.append("")
    for name in entries:
        header += [f"{name} licence:", notices[name], ""]
    scripts = []
    for name, e in entries.items():
        text = code[name].decode()  # exactly the file: its sha256 is the lock's
        for bad in ("</script", "<!--"):  # would end or confuse the inline script element
            if bad in text.lower():
                sys.exit(f"vendor-vega: {name} contains {bad!r}; it cannot be inlined as is")
        for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}"):  # DVC replaces these anywhere in the page
            if placeholder in text:
                sys.exit(f"vendor-vega: {name} contains {placeholder!r}")
        scripts.append(f'<script data-package="{name}@{e["version"]}" data-sha256="{e["sha256"]}">\n{text}\n</script>')
    comment = "\n".join(header).replace("--", "- -")
    return (f"<!DOCTYPE html>\n<!--\n{comment}\n-->\n<html>\n<head>\n    {{refresh_tag}}\n    <meta charset=\"utf-8\">\n"
            f"    <title>MMRAD: dvc plots</title>\n" + "\n".join(scripts) + f"\n<script>\n{EMBED_DEFAULTS}\n</script>\n"
            f"<style>\n{STYLE}\n</style>\n</head>\n<body>\n<header>MMRAD: <code>dvc plots show</code>, works offline ("
            + ", ".join(f"{n} {e['version']}" for n, e in entries.items())
            + " inline)</header>\n<main>\n{plot_divs}\n</main>\n</body>\n</html>\n")


def check() -> list[str]:
    """Problems of the committed page against the lock (empty: fine). Needs only Python."""
    lock = json.loads(LOCK.read_text())
    page = PAGE.read_text(encoding="utf-8")
    problems = []
    found = {m["name"]: m for m in BLOCK.finditer(page)}
    if list(found) != list(lock):
        problems.append(f"inlined packages {list(found)} != lock {list(lock)}")
    for name, e in lock.items():
        m = found.get(name)
        if m is None:
            continue
        if m["version"] != e["version"] or m["sha"] != e["sha256"]:
            problems.append(f"{name}: page says {m['version']} / {m['sha']}, lock {e['version']} / {e['sha256']}")
        if sha256(m["body"].encode()) != e["sha256"]:
            problems.append(f"{name}: inlined code's sha256 differs from the lock (edited by hand?)")
        if PINS.get(name, (None,))[0] != e["version"]:
            problems.append(f"{name}: lock {e['version']} != pin {PINS.get(name)}")
        if f"{name} {e['version']} " not in page or e["integrity"] not in page:
            problems.append(f"{name}: header comment lacks its version / integrity")
    if page.count("{plot_divs}") != 1:
        problems.append("the page must hold the plot_divs placeholder exactly once")
    if re.search(r"<script[^>]*\ssrc=", page, re.I):
        problems.append("the page loads a script from elsewhere")
    if "Redistribution and use in source and binary forms" not in page:
        problems.append("the licence notices are missing")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="verify the committed page against the lock, no npm")
    mode.add_argument("--update", action="store_true", help="accept new pins: rewrite the lock")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for p in problems:
            print(f"vendor-vega: {p}", file=sys.stderr)
        if not problems:
            print(f"vendor-vega: {PAGE.relative_to(ROOT)} matches {LOCK.relative_to(ROOT)}")
        return 1 if problems else 0
    lock = None if args.update or not LOCK.exists() else json.loads(LOCK.read_text())
    entries, code, notices = fetch(lock)
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(render(entries, code, notices), encoding="utf-8")
    LOCK.write_text(json.dumps(entries, indent=2) + "\n")
    print(f"vendor-vega: wrote {PAGE.relative_to(ROOT)} ({PAGE.stat().st_size // 1024} KiB) and {LOCK.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
