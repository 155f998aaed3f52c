"""Launcher-variable mapping, rendezvous address choice, hostfiles, preemption flags, resumable data order.

Fast, single-process tests; the launchers themselves run for real in test_launchers.py.
"""
from __future__ import annotations

import os
import signal
import socket

import pytest
import torch
from deepspeed.launcher.runner import _parse_hostfile

from dpo_ds import cli, distributed, hostfile, preemption, trainer


# ----------------------------------------------------------------- launcher variables
def test_torch_launchers_variables_are_kept():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    assert distributed.map_launcher_env(env) == "torch"
    assert env == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}


def test_srun_task_variables_become_torch_variables():
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
           "SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_JOB_NODELIST": "gpu[07-10]"}
    assert distributed.map_launcher_env(env) == "slurm"
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("5", "1", "8")
    assert env["MASTER_ADDR"] == "gpu07"  # the first node of the step
    assert env["MASTER_PORT"] == "23456"  # 20000 + 123456 % 10000, the same in every task


def test_slurm_batch_shell_is_not_a_task():
    """The batch script has SLURM_PROCID/SLURM_NTASKS too, but no step: python run there is a world of one."""
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[07-10]"}
    assert distributed.map_launcher_env(env) == "single"
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    with socket.socket() as s:  # the chosen port is free
        s.bind(("127.0.0.1", int(env["MASTER_PORT"])))


# ----------------------------------------------------------------- rendezvous address
def test_master_address_order_of_preference():
    here = socket.gethostname()
    assert distributed.master_address([here, "elsewhere"], {"MASTER_ADDR": "10.1.2.3"}) == "10.1.2.3"
    assert distributed.master_address([here, "elsewhere"], {"NCCL_SOCKET_IFNAME": "lo"}) == "127.0.0.1"
    assert distributed.master_address([here, here], {}) == "127.0.0.1"  # one host: loopback
    # "^docker0" lists interfaces to avoid, not one to use; 127.0.0.2 is reached from 127.0.0.1.
    assert distributed.master_address([here, "127.0.0.2"], {"NCCL_SOCKET_IFNAME": "^docker0"}) == "127.0.0.1"


def test_master_address_unreachable_peer_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no-such-host.invalid.*MASTER_ADDR"):
        distributed.master_address([socket.gethostname(), "no-such-host.invalid"], {})


def test_interface_address_exact_and_prefix():
    assert distributed.interface_address("lo") == "127.0.0.1"
    assert distributed.interface_address("=lo") == "127.0.0.1"
    assert distributed.interface_address("l") == "127.0.0.1"  # NCCL-style prefix: lo
    with pytest.raises(RuntimeError, match="nosuchif9"):
        distributed.interface_address("nosuchif9")


# ----------------------------------------------------------------- hostfiles
HOSTFILES = [
    "node1 slots=8\nnode2 slots=8\n",
    "# comment\n\n  node1 slots=4  \nnode2 slots=4 # trailing comment\n",
    "node1 slots=0\n",
    "node1 slots=2 extra words\n",
    "node1 slots=8\nnode1 slots=8\n",
    "node1 slots = 8\n",
    "node1:8\n",
    "node1\n",
    "slots=8\n",
    "# nothing\n\n",
    "",
    "node1 slots=-1\n",
    "node1 slots=8\nbad line here\nnode2 slots=8\n",
]


@pytest.mark.parametrize("text", HOSTFILES)
def test_hostfile_accepts_exactly_what_deepspeed_accepts(text):
    try:
        expected = dict(_parse_hostfile(text.splitlines(keepends=True)))
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(hostfile.HostfileError):
            hostfile.parse_hostfile(text)
    else:
        assert hostfile.parse_hostfile(text).hosts == expected


def test_hostfile_errors_name_every_bad_line():
    text = "node1 slots=8\nnode2:8\nnode1 slots=4\nnode3\n"
    with pytest.raises(hostfile.HostfileError) as err:
        hostfile.parse_hostfile(text, "hosts.txt")
    lines = str(err.value).splitlines()
    assert lines == [
        "hosts.txt:2: 'node2:8' is not `HOST slots=N` (write `node2 slots=8`)",
        "hosts.txt:3: host 'node1' is already listed on line 1 (one line per host; put all its slots there)",
        "hosts.txt:4: 'node3' is not `HOST slots=N` (the slot count is missing: `node3 slots=8` for 8 GPUs)",
    ]


def test_hostfile_warnings_for_lines_deepspeed_takes_silently():
    parsed = hostfile.parse_hostfile("a slots=2 gpus=2\nb slots=0\n", "h")
    assert parsed.hosts == {"a": 2, "b": 0} and parsed.total_slots == 2
    assert parsed.warnings == ["h:1: 'gpus=2' after `slots=2` is ignored by the launcher",
                               "h:2: host 'b' has slots=0: no rank will run there"]


def test_hostfile_example_is_valid():
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "launch" / "hostfile.example"
    assert hostfile.parse_hostfile(example.read_text()).hosts == {"node1": 8, "node2": 8}


def test_expand_nodelist():
    assert hostfile.expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert hostfile.expand_nodelist("r[1-2]n[8-9]") == ["r1n8", "r1n9", "r2n8", "r2n9"]
    assert hostfile.expand_nodelist("x[09-11]") == ["x09", "x10", "x11"]
    with pytest.raises(hostfile.HostfileError, match=r"bad range 'a-3'"):
        hostfile.expand_nodelist("n[a-3]")


@pytest.mark.parametrize("env, slots", [
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "8"}, 4),
    ({"SLURM_GPUS_PER_NODE": "a100:2"}, 2),
    ({"SLURM_NTASKS_PER_NODE": "3(x2)"}, 3),
])
def test_slots_per_node_from_slurm_variables(env, slots):
    assert hostfile.slots_per_node(env) == slots


def test_from_slurm_writes_one_line_per_node():
    env = {"SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_GPUS_ON_NODE": "4"}
    assert hostfile.from_slurm(env) == "gpu1 slots=4\ngpu2 slots=4\n"
    assert hostfile.from_slurm(env, slots=2) == "gpu1 slots=2\ngpu2 slots=2\n"
    with pytest.raises(hostfile.HostfileError, match="pass --slots"):
        hostfile.from_slurm({"SLURM_JOB_NODELIST": "gpu1"})
    with pytest.raises(hostfile.HostfileError, match="SLURM_JOB_NODELIST is not set"):
        hostfile.from_slurm({})


def test_cli_hostfile_check(tmp_path, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("node1 slots=8\nnode2 slots=4\n")
    bad.write_text("node1 slots=8\nnode2 8\n")
    assert cli.main(["hostfile", "check", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: ok, 2 hosts, 12 slots: node1 (8), node2 (4)\n"
    assert cli.main(["hostfile", "check", str(bad)]) == 1
    assert f"{bad}:2: 'node2 8' is not `HOST slots=N` (write `node2 slots=8`)" in capsys.readouterr().err
    assert cli.main(["hostfile", "check", str(tmp_path / "missing")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_cli_hostfile_from_slurm(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[3-4]")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")
    assert cli.main(["hostfile", "from-slurm"]) == 0
    assert capsys.readouterr().out == "n3 slots=2\nn4 slots=2\n"
    out = tmp_path / "hosts"
    assert cli.main(["hostfile", "from-slurm", "--slots", "8", "--output", str(out)]) == 0
    assert hostfile.parse_hostfile(out.read_text()).hosts == {"n3": 8, "n4": 8}


# ----------------------------------------------------------------- preemption
@pytest.fixture
def handlers():
    saved = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}
    preemption._received.clear()
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    preemption._received.clear()


def test_signals_set_the_flag_and_nothing_else(handlers):
    assert preemption.install()
    assert not preemption.requested()
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)  # a second signal: still alive, still just the flag
    assert preemption.received() == [signal.SIGUSR1, signal.SIGTERM]
    assert preemption.requested()


def test_stop_saves_and_raises_preempted_with_exit_75(handlers, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    saved = []
    preemption.install()
    preemption.stop_if_requested(4, saved.append, "cpu")
    assert saved == []  # no signal: nothing happens
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        preemption.stop_if_requested(5, saved.append, "cpu")
    assert saved == [5] and stop.value.code == 75 == preemption.EXIT_PREEMPTED


def test_requeue_outside_slurm_is_refused():
    assert preemption.requeue_slurm_job({}) is False


# ----------------------------------------------------------------- data order across world sizes
def orders(monkeypatch, world: int, start: int) -> list[list[int]]:
    """Each rank's epoch order at this world size (the process-group helpers answer for each rank)."""
    out = []
    for rank in range(world):
        monkeypatch.setattr(trainer, "_world", lambda: world)
        monkeypatch.setattr(trainer, "_rank", lambda r=rank: r)
        out.append(trainer.epoch_order(40, epoch=1, seed=3, shuffle=True, drop_last=True, start=start))
    return out


def test_consumed_samples_resume_on_another_world_size(monkeypatch):
    """2 ranks take 3 micro-batches of 2, then 1 rank resumes: together exactly one pass, nothing twice."""
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    two = orders(monkeypatch, 2, start=0)
    assert two == [perm[0::2], perm[1::2]]
    consumed = 3 * 2 * 2  # micro-batches x batch size x ranks
    seen = two[0][: consumed // 2] + two[1][: consumed // 2]
    assert sorted(seen) == sorted(perm[:consumed])
    (one,) = orders(monkeypatch, 1, start=consumed)
    assert one == perm[consumed:]
    # And back: 4 ranks resuming the same position deal the rest round-robin.
    four = orders(monkeypatch, 4, start=consumed)
    assert [row for group in zip(*four) for row in group] == perm[consumed:]


def test_rest_of_epoch_keeps_the_micro_batches_that_still_fit(monkeypatch):
    """An epoch of 2 steps x 2 micro-batches x 2 pairs x 2 ranks = 16 pairs: after 4 pairs, 3 micro-batches
    (2 rows each on this rank) are left, whatever longer order the rank was given."""
    monkeypatch.setattr(trainer, "_world", lambda: 2)
    order = list(range(18))
    assert trainer.rest_of_epoch(order, epoch_pairs=16, done=4, batch_size=2) == order[:6]
    assert trainer.rest_of_epoch(order, epoch_pairs=16, done=14, batch_size=2) == []  # a partial micro-batch
    assert trainer.rest_of_epoch(order, epoch_pairs=16, done=20, batch_size=2) == []
