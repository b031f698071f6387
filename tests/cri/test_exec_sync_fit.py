"""ExecSync output through the CRI: cut to fit one gRPC message, never a failed call."""

from __future__ import annotations

from shoal_common.messages.monitor import ExecSyncReply
from shoal_cri_gateway.domain.pods import fit_exec_output


def test_exec_sync_output_is_cut_to_fit_one_grpc_message() -> None:
    small = ExecSyncReply(exit_code=0, stdout=b"a" * 10, stderr=b"b" * 5)
    assert fit_exec_output(small, "c", budget=100) is small
    big = fit_exec_output(ExecSyncReply(exit_code=3, stdout=b"a" * 90, stderr=b"b" * 80),
                          "c", budget=100)
    assert (len(big.stdout), len(big.stderr), big.truncated, big.exit_code) == (50, 50, True, 3)
    short_err = fit_exec_output(ExecSyncReply(exit_code=0, stdout=b"a" * 200, stderr=b"b" * 7),
                                "c", budget=100)
    assert (len(short_err.stdout), short_err.stderr) == (93, b"b" * 7)
