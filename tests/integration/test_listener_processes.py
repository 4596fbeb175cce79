"""Several listener processes on one port (``scp.processes``): one node to its senders."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import func, select

from node.db import engine as db
from node.db.models import Instance
from tests import dicom_factory as factory
from tests import peers
from tests.node_process import SegnodeProcesses

# Real programs end to end: run by ./dev test and CI, left out of the edit loop's -m 'not slow'.
pytestmark = pytest.mark.slow

VERIFICATION = "1.2.840.10008.1.1"


def _instances(node: SegnodeProcesses) -> int:
    engine = db.make_engine(node.database_url)
    with db.make_sessionmaker(engine)() as session:
        count = session.scalar(select(func.count(Instance.id))) or 0
    engine.dispose()
    return count


def test_the_association_limit_holds_for_the_node_as_a_whole(
    segnode_factory: Callable[..., SegnodeProcesses],
) -> None:
    node = segnode_factory(
        scp={
            "processes": 2,
            "max_associations": 2,
            "max_associations_per_caller": 2,
            "max_associations_per_address": 2,
        }
    )
    node.serve(workers=False)
    node.wait_for_log("serve", "listener process 2 of 2 serving")
    ae = AE(ae_title="LIMITTEST")
    ae.add_requested_context(VERIFICATION)
    held = [ae.associate("127.0.0.1", node.port, ae_title="SEGNODE") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        # Each new connection lands on either process: wherever it lands, the node is full.
        for _ in range(8):
            extra = ae.associate("127.0.0.1", node.port, ae_title="SEGNODE")
            assert extra.is_rejected
            rejection = extra.acceptor.primitive
            assert rejection is not None
            assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
    finally:
        for assoc in held:
            assoc.release()
    again = ae.associate("127.0.0.1", node.port, ae_title="SEGNODE")  # the slots came back
    assert again.is_established
    assert again.send_c_echo().Status == 0
    again.release()
    assert "the node's 2 associations are all in use" in node.log("serve")


def test_senders_at_once_are_all_stored_by_two_listener_processes(
    segnode_factory: Callable[..., SegnodeProcesses], tmp_path: Path
) -> None:
    node = segnode_factory(scp={"processes": 2, "max_associations": 8})
    node.serve(workers=False)
    node.wait_for_log("serve", "listener process 2 of 2 serving")
    # Four series of one study: the study row is made by whichever process comes first.
    study_uid = generate_uid()
    series = [factory.make_ct_series(tmp_path / f"s{i}", n_slices=5, study_uid=study_uid) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda paths: peers.storescu(paths, node.port, aet="SEGNODE"), series))
    assert [r.returncode for r in results] == [0, 0, 0, 0], [r.stderr for r in results]
    assert _instances(node) == 20
