"""`import lorsa_hf` and the `lorsa-hf` CLI load none of the embedded model or corpus machinery until asked."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("gguf", "lorsa_hf.embedded.model", "lorsa_hf.embedded.corpus")


def _loaded_after(code: str) -> list[str]:
    """The modules of HEAVY (or inside them) that a fresh interpreter holds after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    modules = json.loads(output.strip().splitlines()[-1])
    return [name for name in modules if any(name == heavy or name.startswith(f"{heavy}.") for heavy in HEAVY)]


def test_importing_the_package_loads_no_embedded_machinery() -> None:
    assert _loaded_after("import lorsa_hf") == []


def test_building_the_cli_parser_loads_no_embedded_machinery() -> None:
    code = "import lorsa_hf.cli, contextlib, io\nwith contextlib.redirect_stdout(io.StringIO()):\n" \
        "    try:\n        lorsa_hf.cli.main(['embedded', '--help'])\n    except SystemExit:\n        pass"
    assert _loaded_after(code) == []


def test_embedded_names_resolve_on_first_access() -> None:
    import lorsa_hf
    from lorsa_hf.embedded import cache, corpus, model

    assert lorsa_hf.load_embedded_model is model.load_embedded_model
    assert lorsa_hf.embedded_corpus is corpus.embedded_corpus
    assert {"load_embedded_model", "embedded_corpus"} <= set(dir(lorsa_hf)) and set(lorsa_hf.__all__) <= set(
        dir(lorsa_hf)
    )
    from lorsa_hf.embedded import EMBEDDED_MODEL_ID, EmbeddedAssetError, embedded_corpus_info

    assert (EMBEDDED_MODEL_ID, EmbeddedAssetError, embedded_corpus_info) == (
        model.EMBEDDED_MODEL_ID, cache.EmbeddedAssetError, corpus.embedded_corpus_info
    )
