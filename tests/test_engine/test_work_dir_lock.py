"""One live training run per work_dir; a crashed (killed) run leaves no stuck lock."""
import os
import signal
import subprocess
import sys

import pytest

from cbn_mmdet.engine.work_dir_lock import LOCK_FILE, WorkDirBusy, work_dir_lock
from tests.tiny_config import ROOT, load_tool

HOLDER = ("import sys, time\n"
          "from cbn_mmdet.engine.work_dir_lock import work_dir_lock\n"
          "with work_dir_lock(sys.argv[1]):\n"
          "    print('held', flush=True)\n"
          "    time.sleep(600)\n")


@pytest.fixture
def holder(tmp_path, subprocess_env):
    """Another process holding the lock of ``tmp_path / 'wd'`` (killed with SIGKILL at the end)."""
    work_dir = tmp_path / 'wd'
    proc = subprocess.Popen([sys.executable, '-c', HOLDER, str(work_dir)], stdout=subprocess.PIPE, text=True,
                            env=subprocess_env, cwd=ROOT)
    assert proc.stdout.readline().strip() == 'held'
    yield work_dir, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)


def test_second_holder_is_refused_naming_the_pid(holder):
    work_dir, proc = holder
    with pytest.raises(WorkDirBusy, match=rf"work_dir '{work_dir}' is in use by another training run \(pid "
                                          rf'{proc.pid}'):
        with work_dir_lock(str(work_dir)):
            pass


def test_killed_holder_leaves_no_stuck_lock(holder):
    work_dir, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert (work_dir / LOCK_FILE).exists()          # the file may stay; the lock does not
    with work_dir_lock(str(work_dir)):
        assert (work_dir / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_lock_is_released_after_the_block_and_held_within(tmp_path):
    work_dir = str(tmp_path / 'wd')
    with work_dir_lock(work_dir):
        with pytest.raises(WorkDirBusy):            # a second open file description conflicts too
            with work_dir_lock(work_dir):
                pass
    with work_dir_lock(work_dir):                   # released
        pass


def test_train_tool_refuses_a_work_dir_a_live_run_holds(holder, tiny_cbn_config):
    work_dir, proc = holder
    with pytest.raises(SystemExit) as info:
        load_tool('train.py').main([tiny_cbn_config, '--work-dir', str(work_dir)])
    message = str(info.value.code)
    assert message.startswith('tools/train.py: config error: work_dir') and f'pid {proc.pid}' in message
    assert sorted(p.name for p in work_dir.iterdir()) == [LOCK_FILE]   # nothing of the refused run
