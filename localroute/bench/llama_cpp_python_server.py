"""llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`), loading its model with
localroute's extra-buffer choice, for the bench's `--vs llama-cpp-python` baseline.

llama_cpp.server has no option for `use_extra_bufts` and calls `llama_cpp.Llama(...)`; this
process swaps in `cpu_features.llama_class` first (LOCALROUTE_USE_EXTRA_BUFTS=0/1, set by
bench.servers), so on an AMX CPU the baseline does not crash and elsewhere it runs what localroute runs.

    python -m localroute.bench.llama_cpp_python_server --model M.gguf ...   (llama_cpp.server's flags)
"""

from __future__ import annotations

import os


def main() -> None:
    import llama_cpp
    import llama_cpp.server.__main__ as server

    from localroute.backends.cpu_features import llama_class

    llama_cpp.Llama = llama_class(os.environ.get("LOCALROUTE_USE_EXTRA_BUFTS", "0") == "1")  # type: ignore[misc]
    server.main()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
