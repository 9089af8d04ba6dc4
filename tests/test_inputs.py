"""Every input the CLI reads, made bad as a careless user or an attacker would: exit 2, exactly one
line on stderr naming the file (and the key), no traceback, nothing written outside the workdir.
Each case fails before a model is loaded (the embedded LLM is never started here)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
from typer.testing import CliRunner

from conftest import ROOT, write_config
from selftune.cli import app

LATIN1 = "# café au lait\n".encode("latin-1")  # one byte 0xe9: not UTF-8
ITEM = '{"question": "q", "answer": "a"}\n'


class Bad(NamedTuple):
    argv: list[str]
    file: Path  # the file the error line must name
    key: str  # the key (or "line N") it must name next, "" if none
    fragment: str  # a piece of what was expected


@dataclass
class Ws:
    """A valid workspace in tmp_path; a case spoils one input and returns the command to run."""

    tmp: Path
    docs: Path
    cfg: Path
    rubric: Path
    questions: Path
    work: Path

    def eval(self, cfg: Path | None = None, questions: Path | None = None, out: Path | None = None,
             params: str = "baseline") -> list[str]:
        return ["eval", str(cfg or self.cfg), "--questions", str(questions or self.questions), "--out",
                str(out or self.tmp / "answers.jsonl"), "--params", params]

    def tune(self, cfg: Path) -> list[str]:
        return ["tune", str(cfg)]

    def judge(self, items: Path) -> list[str]:
        return ["judge", "--rubric", str(self.rubric), "--items", str(items), "--out", str(self.tmp / "o.jsonl")]

    def calibrate(self, labels: Path) -> list[str]:
        return ["calibrate", "--rubric", str(self.rubric), "--labels", str(labels)]

    def append(self, path: Path, text: str | bytes) -> Path:
        data = text.encode() if isinstance(text, str) else text
        path.write_bytes(path.read_bytes() + data)
        return path

    def next_line(self, path: Path, text: str | bytes) -> str:
        """Append ``text`` to ``path``; "line N", N the line it starts on."""
        n = len(path.read_bytes().splitlines()) + 1
        self.append(path, text)
        return f"line {n}"

    def fifo(self, name: str) -> Path:
        """A named pipe: reading it would block for ever."""
        os.mkfifo(self.tmp / name)
        return self.tmp / name

    def file(self, name: str, data: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def corpus(self, name: str, files: dict[str, str | bytes], **extra: str) -> Path:
        """A config over a fresh corpus folder ``name`` holding ``files``; ``extra`` adds corpus keys."""
        d = self.tmp / name
        d.mkdir()
        for rel, data in files.items():
            (d / rel).write_bytes(data.encode() if isinstance(data, str) else data)
        keys = "".join(f", {k}: {v}" for k, v in extra.items())
        text = self.cfg.read_text().replace(f"corpus: {{path: {self.docs}}}", f"corpus: {{path: {d}{keys}}}")
        return self.file(f"{name}.yaml", text)

    def params(self, body: str | bytes, key: str, fragment: str, cfg: Path | None = None) -> Bad:
        """``eval --params FILE`` with ``body`` in FILE."""
        path = self.file("params.yaml", body)
        return Bad(self.eval(cfg, params=str(path)), path, key, fragment)


def _outside_links(w: Ws) -> Bad:
    secret = w.file("outside/passwd", "root:x:0:0:root:/root:/bin/bash\n")
    cfg = w.corpus("linked", {})
    (w.tmp / "linked" / "passwd.txt").symlink_to(secret)
    (w.tmp / "linked" / "etc").symlink_to(secret.parent, target_is_directory=True)
    return Bad(w.eval(cfg), cfg, "corpus.path", "2 files skipped: link outside the corpus folder")


def _no_questions(w: Ws) -> Bad:
    w.questions.unlink()
    return Bad(w.eval(), w.questions, "", "file not found")


def _custom_system(w: Ws, overlap: int = 20) -> Path:
    """A config whose system is user code, so the builtin's disjoint chunk ranges do not apply."""
    text = w.cfg.read_text().replace("sut:\n", "sut:\n  system: mymod:System\n")
    text = text.replace("{type: choice, choices: [120, 200], initial: 200}",
                        "{type: int, low: 50, high: 500, initial: 200}")
    text = text.replace("{type: choice, choices: [0, 20], initial: 20}",
                        f"{{type: int, low: 0, high: 400, initial: {overlap}}}")
    return w.file("custom.yaml", text)


def _edit(w: Ws, old: str, new: str) -> Path:
    """A copy of the config with ``old`` replaced by ``new``."""
    return w.file("edited.yaml", w.cfg.read_text().replace(old, new))


CASES: dict[str, Callable[[Ws], Bad]] = {
    # the config
    "config-unknown-key": lambda w: Bad(w.tune(w.append(w.cfg, "colour: blue\n")), w.cfg, "colour", "unknown key"),
    "config-wrong-type": lambda w: Bad(w.tune(w.append(w.cfg, "optimizer: {rounds: many}\n")), w.cfg,
                                       "optimizer.rounds", "integer"),
    "config-out-of-range": lambda w: Bad(w.tune(w.append(w.cfg, "gate: {confidence: 2}\n")), w.cfg,
                                         "gate.confidence", "less than 1"),
    "config-unsafe-yaml-tag":
        lambda w: Bad(w.tune(w.append(w.cfg, "x: !!python/object/apply:os.system [touch pwned]\n")),
                      w.cfg, "", "expected valid YAML"),
    "config-not-yaml": lambda w: Bad(w.tune(w.append(w.cfg, "name: [unclosed\n")), w.cfg, "", "valid YAML"),
    "config-not-a-mapping": lambda w: Bad(w.tune(w.file("list.yaml", "- a\n")), w.tmp / "list.yaml", "", "mapping"),
    "config-missing": lambda w: Bad(w.tune(w.tmp / "absent.yaml"), w.tmp / "absent.yaml", "", "file not found"),
    "config-is-a-directory": lambda w: Bad(w.tune(w.docs), w.docs, "", "is a directory, expected a YAML file"),
    "config-is-a-pipe": lambda w: Bad(w.tune(w.fifo("pipe.yaml")), w.tmp / "pipe.yaml", "", "not a regular file"),
    "config-not-utf8": lambda w: Bad(w.tune(w.cfg), w.cfg, w.next_line(w.cfg, LATIN1), "expected UTF-8 text"),
    "config-control-character": lambda w: Bad(w.tune(w.cfg), w.cfg, w.next_line(w.cfg, "x: a\x07b\n"),
                                              "expected printable text"),
    "config-initial-text-too-long": lambda w: Bad(w.tune(_edit(w, '"Answer from the context."}',
                                                               '"Answer from the context.", max_chars: 20}')),
                                                  w.tmp / "edited.yaml", "sut.params.instructions.initial",
                                                  "at most 20 characters"),
    "config-initial-overlap-not-below-size":
        lambda w: Bad(w.tune(_custom_system(w, overlap=300)), w.tmp / "custom.yaml",
                      "sut.params.chunk_overlap.initial", "chunk_overlap < chunk_size"),
    "config-corpus-missing": lambda w: Bad(w.tune(w.cfg) + ["--corpus", str(w.tmp / "nope")], w.cfg, "--corpus",
                                           "existing folder"),
    "config-rubric-missing": lambda w: Bad(w.tune(_edit(w, str(w.rubric), str(w.tmp / "nope.yaml"))),
                                           w.tmp / "edited.yaml", "rubric", "existing rubric"),
    "config-probes-file-missing":
        lambda w: Bad(w.tune(_edit(w, "probes: {count: 9}", "probes: {count: 9, file: no.jsonl}")),
                      w.tmp / "edited.yaml", "probes.file", "existing JSONL file"),
    "config-glob-leaves-corpus": lambda w: Bad(w.tune(w.corpus("g", {}, glob='["../../etc/*"]')), w.tmp / "g.yaml",
                                               "corpus.glob[0]", "relative to corpus.path"),
    "config-max-file-mb-zero": lambda w: Bad(w.tune(w.corpus("m", {}, max_file_mb="0")), w.tmp / "m.yaml",
                                             "corpus.max_file_mb", "greater than 0"),
    "config-follow-symlinks-not-bool":
        lambda w: Bad(w.tune(w.corpus("f", {}, follow_symlinks="maybe")), w.tmp / "f.yaml",
                      "corpus.follow_symlinks", "boolean"),
    # the rubric (read when the session starts, before any model)
    "rubric-not-utf8": lambda w: Bad(w.eval(), w.rubric, w.next_line(w.rubric, LATIN1), "expected UTF-8 text"),
    "rubric-unknown-key": lambda w: Bad(w.eval(), w.append(w.rubric, "colour: blue\n"), "colour", "unknown key"),
    # the corpus
    "corpus-empty": lambda w: Bad(w.eval(w.corpus("empty", {})), w.tmp / "empty.yaml", "corpus.path", "found none"),
    "corpus-only-blank-files": lambda w: Bad(w.eval(w.corpus("blank", {"a.txt": "  \n"})), w.tmp / "blank.yaml",
                                             "corpus.path", "found none"),
    "corpus-only-over-size-limit":
        lambda w: Bad(w.eval(w.corpus("big", {"big.txt": "word " * 400}, max_file_mb="0.001")),
                      w.tmp / "big.yaml", "corpus.path",
                      "1 file skipped: over the 0.001 MB limit"),
    "corpus-only-not-utf8": lambda w: Bad(w.eval(w.corpus("latin", {"a.txt": LATIN1})), w.tmp / "latin.yaml",
                                          "corpus.path", "1 file skipped: not UTF-8 text"),
    "corpus-only-links-outside": _outside_links,
    # the questions and output of `eval`
    "questions-missing": _no_questions,
    "questions-is-a-directory":
        lambda w: Bad(w.eval(questions=w.docs), w.docs, "", "is a directory, expected a JSONL file"),
    "questions-empty": lambda w: Bad(w.eval(), w.file(w.questions.name, "\n\n"), "", "no questions"),
    "questions-not-utf8": lambda w: Bad(w.eval(), w.append(w.questions, LATIN1), "line 2", "expected UTF-8 text"),
    "questions-malformed-line": lambda w: Bad(w.eval(), w.append(w.questions, "{not json\n"), "line 2", "JSON object"),
    "questions-no-question": lambda w: Bad(w.eval(), w.append(w.questions, '{"q": "x"}\n'), "line 2.question",
                                           "non-empty string"),
    "questions-unknown-key": lambda w: Bad(w.eval(), w.append(w.questions, '{"question": "x", "colour": 1}\n'),
                                           "line 2.colour", "unknown key"),
    "out-is-a-directory": lambda w: Bad(w.eval(out=w.docs), w.docs, "", "is a directory"),
    # the params file of `eval --params`
    "params-top-k-text": lambda w: w.params("params: {top_k: three}\n", "params.top_k",
                                            "expected an integer in [1, 3], got 'three'"),
    "params-top-k-zero":
        lambda w: w.params("params: {top_k: 0}\n", "params.top_k", "expected an integer in [1, 3], got 0"),
    "params-top-k-float": lambda w: w.params("params: {top_k: 2.0}\n", "params.top_k", "integer"),
    "params-chunk-size-negative": lambda w: w.params("params: {chunk_size: -5}\n", "params.chunk_size",
                                                     "expected one of [120, 200], got -5"),
    "params-overlap-over-size": lambda w: w.params("params: {chunk_overlap: 600}\n", "params.chunk_overlap",
                                                   "expected one of [0, 20], got 600"),
    "params-overlap-not-below-size":
        lambda w: w.params("params: {chunk_size: 100, chunk_overlap: 200}\n",
                           "params.chunk_overlap", "expected 0 <= chunk_overlap < chunk_size, "
                           "got 200 and chunk_size 100", cfg=_custom_system(w)),
    "params-choice-wrong-type":
        lambda w: w.params("params: {chunk_size: '200'}\n", "params.chunk_size", "expected one of"),
    "params-text-too-long": lambda w: w.params(f"params: {{instructions: {'x' * 801}}}\n", "params.instructions",
                                               "at most 800 characters"),
    "params-text-empty": lambda w: w.params("params: {instructions: ''}\n", "params.instructions", "non-empty text"),
    "params-unknown-name": lambda w: w.params("params: {temperature: 2}\n", "params.temperature", "unknown param"),
    "params-extra-top-level-key": lambda w: w.params("params: {top_k: 2}\nnote: x\n", "note", "unknown key"),
    "params-not-a-mapping": lambda w: w.params("params: [1, 2]\n", "params", "mapping"),
    "params-not-utf8": lambda w: w.params(b"params: {top_k: 2}\n" + LATIN1, "line 2", "expected UTF-8 text"),
    "params-is-a-directory": lambda w: Bad(w.eval(params=str(w.docs)), w.docs, "", "is a directory"),
    "params-missing": lambda w: Bad(w.eval(params=str(w.tmp / "nope.yaml")), w.tmp / "nope.yaml", "", "no params file"),
    "params-best-before-any-tune":
        lambda w: Bad(w.eval(params="best"), w.work / "best" / "t.yaml", "", "no params file"),
    # the inputs of `judge` and `calibrate`
    "judge-items-empty": lambda w: Bad(w.judge(w.file("i.jsonl", "")), w.tmp / "i.jsonl", "", "no items"),
    "judge-items-not-utf8":
        lambda w: Bad(w.judge(w.file("i.jsonl", ITEM.encode() + LATIN1)), w.tmp / "i.jsonl", "line 2",
                      "expected UTF-8 text"),
    "judge-items-malformed-line": lambda w: Bad(w.judge(w.file("i.jsonl", "{oops\n")), w.tmp / "i.jsonl", "line 1",
                                                "JSON object"),
    "judge-rubric-not-utf8": lambda w: Bad(w.judge(w.file("i.jsonl", ITEM)), w.rubric, w.next_line(w.rubric, LATIN1),
                                           "expected UTF-8 text"),
    "calibrate-labels-not-utf8":
        lambda w: Bad(w.calibrate(w.file("l.jsonl", b'{"question": "q", "answer": "a", "labels": '
                                         b'{"grounded": 3}}\n' + LATIN1)),
                      w.tmp / "l.jsonl", "line 2", "expected UTF-8 text"),
    "calibrate-labels-unknown-criterion":
        lambda w: Bad(w.calibrate(w.file("l.jsonl", '{"question": "q", "answer": "a", '
                                         '"labels": {"taste": 3}}\n')),
                      w.tmp / "l.jsonl", "line 1.labels.taste", "unknown criterion"),
    "judge-out-is-a-directory":
        lambda w: Bad(w.judge(w.file("i.jsonl", ITEM))[:-1] + [str(w.docs)], w.docs, "", "is a directory"),
    "calibrate-labels-a-directory": lambda w: Bad(w.calibrate(w.docs), w.docs, "", "is a directory"),
    "config-embedder-missing-folder": lambda w: Bad(w.tune(w.append(w.cfg, "embedder: ./no-such-model\n")), w.cfg,
                                                    "embedder", "existing sentence-transformers folder"),
    "config-probes-file-bad-line":
        lambda w: Bad(w.tune(w.append(w.cfg, f"probes: {{file: {w.file('p.jsonl', '{oops' + chr(10))}}}\n")),
                      w.tmp / "p.jsonl", "line 1", "JSON object"),
}


@pytest.fixture
def ws(tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Ws:
    monkeypatch.chdir(tmp_path)  # anything written to a relative path would land here, and be seen
    import selftune.lm
    import selftune.loop

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded: the bad input got past the door")

    for module, name in ((selftune.loop, "Embedder"), (selftune.loop, "Models"), (selftune.lm, "LlamaCppEngine")):
        monkeypatch.setattr(module, name, no_model)
    cfg = write_config(tmp_path, corpus_dir)
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": "What does pass do?"}\n', encoding="utf-8")
    return Ws(tmp_path, corpus_dir, cfg, tmp_path / "rubric.yaml", questions, tmp_path / "work")


def _files(root: Path, skip: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.is_symlink() and skip not in p.parents}  # is_file: not the pipe


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(ws: Ws, case: str) -> None:
    argv, file, key, fragment = CASES[case](ws)
    before = _files(ws.tmp, ws.work)
    result = CliRunner().invoke(app, argv)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {file}: {key}: " if key else f"error: {file}: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert _files(ws.tmp, ws.work) == before  # nothing written, nothing changed, outside the workdir


@pytest.mark.parametrize("case", ["config-not-utf8", "corpus-only-links-outside"])
def test_a_real_process_prints_one_line(ws: Ws, case: str) -> None:
    """The same in a fresh interpreter: logging, warnings and imports add nothing to stderr."""
    argv, file, key, fragment = CASES[case](ws)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "selftune.cli", *argv], capture_output=True, text=True,
                          env=env, cwd=ws.tmp, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {file}: {key}: ") and fragment in lines[0] and proc.stdout == ""
