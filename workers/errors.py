"""Job faults, split by what to do about them.

The task layer retries by exception type: a :class:`TransientError` (PACS busy, connection lost) is
retried with backoff; a :class:`PermanentError` (a bad series) ends the job at once with its reason.
Each message is written for the admin who reads it in the dashboard: it says what is wrong and,
where it can, what to do. Messages never carry patient identifiers.
"""

from __future__ import annotations


class JobError(Exception):
    """A fault while processing a job; ``str(err)`` is the reason a person reads."""


class TransientError(JobError):
    """Worth retrying later: the cause is outside the data (network, a busy or stopped PACS)."""


class DestinationUnavailableError(TransientError):
    """A destination could not be reached or did not answer success."""


class PermanentError(JobError):
    """Retrying cannot help: the job fails (or is rejected) with this reason."""


class SeriesRejectedError(PermanentError):
    """The series cannot be segmented safely (inconsistent geometry, too few slices, not CT ...).

    The job ends REJECTED: nothing is wrong with the node, the input is unsuitable.
    """


class ProcessingFailedError(PermanentError):
    """The node failed on a series it should have handled (a segmenter or writer fault): FAILED."""


class DeliveryRefusedError(PermanentError):
    """A destination answered with a failure that resending will not change (e.g. 0xA900)."""


class JobLostError(Exception):
    """The job stopped being this worker's while it worked (cancelled, or taken over after its
    lease lapsed): the work stops, and nothing is recorded, since the job is someone else's now."""
