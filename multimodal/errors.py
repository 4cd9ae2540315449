"""Errors meant for the user: printed as one line, never as a traceback."""


class UserError(Exception):
    """A problem with the user's config, records or model directory."""


class RecordError(Exception):
    """One record cannot be used (missing file, undecodable image, garbage value).

    Batch jobs catch it per row: the row gets status=error and this message, the run goes on.
    Messages must not contain DICOM header values (names, IDs, dates).
    """
