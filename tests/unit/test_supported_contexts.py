"""The listener's supported presentation contexts: copied per association without re-validating."""

from __future__ import annotations

import copy

from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from node.core.config import ScpSettings
from node.receive.fastpath.contexts import supported_contexts
from node.receive.listener import build_ae


def _described(contexts: list[PresentationContext]) -> list[tuple[object, ...]]:
    return [
        (cx.abstract_syntax, list(cx.transfer_syntax), cx.scu_role, cx.scp_role, cx.context_id)
        for cx in contexts
    ]


def test_the_contexts_are_the_aes_own() -> None:
    ae = build_ae(ScpSettings())
    assert _described(supported_contexts(ae)) == _described(ae.supported_contexts)


def test_a_copy_is_equal_and_changing_it_leaves_the_listeners_alone() -> None:
    contexts = supported_contexts(build_ae(ScpSettings()))
    before = _described(contexts)
    copied = copy.deepcopy(contexts)
    assert _described(copied) == before
    copied[0].transfer_syntax.pop()
    copied[0].context_id = 7
    copied[0].scp_role = True
    assert _described(contexts) == before
    assert copied[0].abstract_syntax is contexts[0].abstract_syntax  # the UID object is shared


def test_negotiation_on_copies_accepts_as_on_the_originals() -> None:
    ae = build_ae(ScpSettings())
    proposed = PresentationContext()
    proposed.context_id = 1
    proposed.abstract_syntax = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    proposed.transfer_syntax = ["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2"]
    ours, _ = negotiate_as_acceptor([proposed], copy.deepcopy(supported_contexts(ae)))
    theirs, _ = negotiate_as_acceptor([proposed], copy.deepcopy(ae.supported_contexts))
    assert [(cx.result, cx.transfer_syntax) for cx in ours] == [
        (cx.result, cx.transfer_syntax) for cx in theirs
    ]
    assert ours[0].result == 0 and ours[0].transfer_syntax[0] in proposed.transfer_syntax
