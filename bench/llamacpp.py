"""llama.cpp's `llama-server` and converters, from the source vendored in the PyPI sdist of
llama-cpp-python: fetched and built once into a cache, then started and asked for completions.

Cache layout (`<cache>` = ~/.cache/peftserve/llamacpp/<version> unless given):
    <cache>/sdist/llama_cpp_python-<version>.tar.gz   pip download --no-binary :all:
    <cache>/src/                                       its vendor/llama.cpp
    <cache>/build/, <cache>/build.log                  the cmake build
    <cache>/bin/llama-server                           the binary, copied last: its presence
                                                       means the build finished
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

VERSION = "0.3.36"
BUILD_JOBS = 2  # the machine is shared: two jobs, at nice 19
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # would download the web UI
    "-DLLAMA_OPENSSL=OFF",
)


def default_cache_dir(version: str = VERSION) -> Path:
    return Path.home() / ".cache" / "peftserve" / "llamacpp" / version


def find_cmake() -> str | None:
    """cmake on PATH, else the one the PyPI `cmake` wheel puts next to this interpreter."""
    found = shutil.which("cmake")
    if found:
        return found
    beside = Path(sys.executable).parent / "cmake"
    return str(beside) if beside.is_file() else None


def missing_tools(cached_binary: bool) -> list[str]:
    """What the build needs and this machine lacks; nothing when the binary is cached."""
    if cached_binary:
        return []
    missing = []
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        missing.append("a C compiler (cc/gcc/clang)")
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        missing.append("a C++ compiler (c++/g++/clang++)")
    if find_cmake() is None:
        missing.append("cmake (apt-get install cmake, or pip install cmake)")
    return missing


def skip_message(missing: list[str]) -> str:
    return ("SKIP bench/vs_llamacpp.py: building llama.cpp's llama-server needs "
            + ", ".join(missing) + "; nothing was run")


@dataclass(frozen=True)
class Checkout:
    """The unpacked llama.cpp source of one llama-cpp-python version, and its built server."""

    cache: Path
    version: str = VERSION

    @property
    def src(self) -> Path:
        return self.cache / "src"

    @property
    def server(self) -> Path:
        return self.cache / "bin" / "llama-server"

    def fetch(self) -> Path:
        """Downloads the sdist (PyPI, through pip) and unpacks its vendor/llama.cpp, once."""
        if (self.src / "CMakeLists.txt").is_file():
            return self.src
        sdist_dir = self.cache / "sdist"
        sdists = sorted(sdist_dir.glob(f"llama_cpp_python-{self.version}.tar.gz"))
        if not sdists:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                            "--no-deps", "-d", str(sdist_dir),
                            f"llama-cpp-python=={self.version}"], check=True)
            sdists = sorted(sdist_dir.glob(f"llama_cpp_python-{self.version}.tar.gz"))
        prefix = f"llama_cpp_python-{self.version}/vendor/llama.cpp/"
        tmp = Path(tempfile.mkdtemp(prefix=".src-", dir=self.cache))
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp, members=members, filter="data")
        os.replace(tmp, self.src)
        return self.src

    def build(self, jobs: int = BUILD_JOBS) -> Path:
        """cmake -> the llama-server target only, Release, -DGGML_NATIVE=ON, under nice 19;
        the log goes to <cache>/build.log. Returns the binary."""
        if self.server.is_file():
            return self.server
        self.fetch()
        cmake = find_cmake()
        assert cmake is not None, "missing_tools() is checked first"
        build = self.cache / "build"
        log_path = self.cache / "build.log"
        print(f"building llama-server {self.version} (-j{jobs}, nice 19; log: {log_path}); "
              "~10 min on 2 cores, once", flush=True)
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            for cmd in ([cmake, "-S", str(self.src), "-B", str(build), *CMAKE_OPTIONS],
                        [cmake, "--build", str(build), "--target", "llama-server",
                         "-j", str(jobs)]):
                log.write("$ " + " ".join(cmd) + "\n")
                log.flush()
                done = subprocess.run(["nice", "-n", "19", *cmd], stdout=log,
                                      stderr=subprocess.STDOUT, check=False)
                if done.returncode:
                    raise RuntimeError(f"llama.cpp build failed ({cmd[1]}); see {log_path}")
        self.server.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", self.server.with_suffix(".tmp"))
        os.replace(self.server.with_suffix(".tmp"), self.server)
        print(f"built {self.server} in {time.perf_counter() - t0:.0f} s", flush=True)
        return self.server

    def commit(self) -> str:
        """The llama.cpp commit the sdist vendors (its submodule HEAD, kept in the sdist's
        .git; the build itself reports "unknown"), or ''."""
        member = f"llama_cpp_python-{self.version}/.git/modules/vendor/llama.cpp/HEAD"
        for sdist in sorted((self.cache / "sdist").glob("llama_cpp_python-*.tar.gz")):
            with tarfile.open(sdist) as tar:
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    continue
                if f is not None:
                    return f.read().decode().strip()[:12]
        return ""

    def converter_python(self) -> Path:
        """The interpreter of <cache>/convert-venv, made once: this source's gguf-py and
        sentencepiece (its converters import it even for BPE vocabularies; requirement pinned
        as in its requirements/) installed there; torch, transformers and safetensors are read
        from the running environment through a .pth file, which stays unchanged."""
        venv = self.cache / "convert-venv"
        python = venv / "bin" / "python"
        if (venv / "ready").is_file():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = subprocess.run([str(python), "-c", "import sysconfig; "
                               "print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        ours = [p for p in sys.path if p.endswith("site-packages")]
        (Path(site) / "peftserve-env.pth").write_text("\n".join(ours) + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps",
                        "sentencepiece>=0.1.98,<0.3.0", str(self.src / "gguf-py")], check=True)
        (venv / "ready").write_text(self.version + "\n")
        return python

    def convert_model(self, hf_dir: Path, out: Path, outtype: str) -> Path:
        """convert_hf_to_gguf.py of this source, in converter_python()."""
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            self._convert("convert_hf_to_gguf.py", str(hf_dir), "--outtype", outtype,
                          "--outfile", str(out))
        return out

    def convert_lora(self, lora_dir: Path, base_hf_dir: Path, out: Path) -> Path:
        if not out.is_file():
            self._convert("convert_lora_to_gguf.py", str(lora_dir), "--base", str(base_hf_dir),
                          "--outtype", "bf16", "--outfile", str(out))
        return out

    def _convert(self, script: str, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
        env["HF_HUB_OFFLINE"] = "1"
        done = subprocess.run([str(self.converter_python()), str(self.src / script), *args],
                              env=env,
                              capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"{script} {' '.join(args)} failed:\n{done.stderr[-3000:]}")


class LlamaServer:
    """One `llama-server` process on a free loopback port: `threads` threads, `parallel` slots
    of `ctx_per_slot` tokens each, the LoRA GGUFs loaded at scale 0 (a request turns its own on
    with the `lora` field); `extra`: more arguments, as given."""

    def __init__(self, binary: Path, model: Path, *, threads: int, parallel: int,
                 ctx_per_slot: int, loras: list[Path], log: Path,
                 extra: Sequence[str] = ()) -> None:
        self.port = _free_port()
        cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
               "-t", str(threads), "-tb", str(threads), "-np", str(parallel),
               "-c", str(parallel * ctx_per_slot), "--no-webui", "--no-warmup"]
        # unified KV off by default on older builds; "-cb" (continuous batching) is the default
        for lora in loras:
            cmd += ["--lora", str(lora)]
        if loras:
            cmd.append("--lora-init-without-apply")
        cmd += list(extra)
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}); "
                                   f"see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise RuntimeError(f"llama-server not ready after {timeout_s} s; see {self.log.name}")

    def complete(self, prompt: list[int], n: int, lora: int | None) -> dict:
        """One greedy completion of `n` tokens (EOS ignored, no prompt cache reuse); the
        server's JSON answer, with its `timings`."""
        body: dict[str, object] = {"prompt": prompt, "n_predict": n, "temperature": 0.0,
                                   "top_k": 1, "ignore_eos": True, "cache_prompt": False,
                                   "stream": False}
        if lora is not None:
            body["lora"] = [{"id": lora, "scale": 1.0}]
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=1800) as resp:
            return json.loads(resp.read())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
