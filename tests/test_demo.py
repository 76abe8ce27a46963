"""``medseqft demo``'s lanes: runs at once with a share of the cores each, output labelled, failures named
(real child processes; the demo's trainings themselves are measured by running it, see README)."""

import os
import sys

from nnunetv2_medseqft.reports.demo import CPU_PHASES, M0_REFERENCES, METHODS, run_lanes
from nnunetv2_medseqft.threads import THREADS_ENV, THREADS_FILE_ENV, threads_per_job


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_lanes_run_at_once_label_their_output_and_stop_at_their_first_failure(capsys):
    threads = "import os; print('threads', os.environ.get('" + THREADS_ENV + "'))"
    failed = run_lanes([[("a", _python(threads)), ("b", _python("import sys; sys.exit(3)")), ("c", _python(threads))],
                        [("d", _python("print('line 1'); print('line 2')"))]], dict(os.environ))
    out = capsys.readouterr().out.splitlines()
    assert failed == ["b"]
    assert f"[a] threads {max(1, (os.cpu_count() or 1) // 2)}" in out
    assert "[d] line 1" in out and "[d] line 2" in out
    assert not any(line.startswith("[c]") for line in out)  # the lane stopped at b


def test_one_lane_keeps_nnunets_threads_and_the_cpu_phases_hold_every_method_once(capsys):
    env = {k: v for k, v in os.environ.items() if k != THREADS_ENV}
    assert run_lanes([[("x", _python("import os; print(os.environ.get('" + THREADS_ENV + "'))"))]], env) == []
    assert capsys.readouterr().out.strip() == "[x] None"
    assert sorted(m for lanes in CPU_PHASES for lane in lanes for m in lane) == sorted(METHODS + M0_REFERENCES)
    # every run of the demo starts from or is full fine-tuning of M0 on a task: those trainings go first, at once;
    # then the runs that start from them (a lane waiting on another lane's training would leave a core idle)
    assert CPU_PHASES[0] == tuple((ref,) for ref in M0_REFERENCES) and all(len(lanes) <= 2 for lanes in CPU_PHASES)


def test_a_finished_lane_gives_its_cores_to_the_lanes_still_running(capsys):
    """The slow lane reads the threads file after the quick lane ended: every core for the one left."""
    wait_and_read = ("import os, time\nfrom nnunetv2_medseqft.threads import threads_per_job\n"
                     f"path = os.environ['{THREADS_FILE_ENV}']\n"
                     "print('at start', open(path).read().strip())\n"
                     "end = time.time() + 30\n"
                     "while open(path).read().strip() != str(threads_per_job(1)) and time.time() < end:\n"
                     "    time.sleep(0.1)\n"
                     "print('after', open(path).read().strip())\nprint('file', path)")
    assert run_lanes([[("slow", _python(wait_and_read))], [("quick", _python("pass"))]], dict(os.environ)) == []
    out = capsys.readouterr().out.splitlines()
    assert f"[slow] at start {threads_per_job(2)}" in out and f"[slow] after {threads_per_job(1)}" in out
    path = next(line.split(" ", 2)[2] for line in out if line.startswith("[slow] file "))
    assert not os.path.exists(path)  # the lane runner removes it
