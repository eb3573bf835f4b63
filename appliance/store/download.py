"""Resumable HTTP(S) download of one file into a `.part` file, with a progress bar.

Used only by `appliance models fetch`: the daemon never downloads. A dropped
connection is resumed with a `Range` request (a server that ignores ranges restarts
the file); a server whose file has the wrong size is refused at once. The caller
checks the digest and moves the part file into place.
"""

from __future__ import annotations

import http.client
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger("appliance.download")

_CHUNK = 256 * 1024
USER_AGENT = "appliance-model-fetch/1"


class DownloadError(Exception):
    """The file could not be downloaded; the message says why."""


def _open(url: str, start: int, timeout: float) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if start:
        request.add_header("Range", f"bytes={start}-")
    response: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=timeout)
    return response


def _remote_size(response: http.client.HTTPResponse, start: int) -> int | None:
    """The full size of the remote file, from Content-Range or Content-Length."""
    if response.status == 206:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def download(
    url: str,
    part: Path,
    size: int,
    *,
    label: str = "",
    retries: int = 5,
    timeout: float = 30.0,
    backoff: float = 1.0,
    progress: bool | None = None,
) -> None:
    """Download `url` into `part` until it holds `size` bytes, resuming what is there.

    Raises DownloadError when the server refuses the file, serves a file of another
    size, or stops answering for `retries` attempts in a row. The part file is kept
    then, so running the fetch again resumes it.
    """
    label = label or part.name
    failures = 0
    with tqdm(
        total=size,
        initial=0,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=label,
        disable=True if progress is False else None,
        leave=False,
    ) as bar:
        while True:
            have = part.stat().st_size if part.exists() else 0
            if have > size:
                part.unlink()
                have = 0
            bar.n = have
            bar.refresh()
            if have == size:
                return
            try:
                response = _open(url, have, timeout)
            except urllib.error.HTTPError as exc:
                if exc.code == 416 and have:  # range past the end: start again
                    part.unlink()
                    continue
                if exc.code < 500:
                    raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
                problem = f"HTTP {exc.code} {exc.reason}"
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                problem = f"cannot connect: {reason}"
            else:
                with response:
                    if response.status != 206 and have:
                        logger.info("%s: server ignored the range request; restarting", label)
                        have = 0
                    remote = _remote_size(response, have)
                    if remote is not None and remote != size:
                        raise DownloadError(
                            f"{url}: the server's file is {remote} bytes, the manifest says "
                            f"{size}: wrong or truncated file, not downloaded"
                        )
                    before = have
                    try:
                        with part.open("ab" if have else "wb") as out:
                            while chunk := response.read(_CHUNK):
                                if have + len(chunk) > size:
                                    raise DownloadError(f"{url}: more than {size} bytes sent")
                                out.write(chunk)
                                have += len(chunk)
                                bar.update(len(chunk))
                    except (OSError, http.client.HTTPException) as exc:
                        problem = f"connection lost at byte {have}: {exc!r}"
                    else:
                        if have == size:
                            return
                        problem = f"connection closed at byte {have} of {size}"
                    if have > before:
                        failures = 0  # progress was made: the retry budget starts again
            failures += 1
            if failures > retries:
                kept = part.stat().st_size if part.exists() else 0
                resume = (
                    f"{kept} of {size} bytes kept in a part file: run the fetch again to resume"
                    if kept
                    else "nothing downloaded: run the fetch again when the server is reachable"
                )
                raise DownloadError(f"{url}: {problem}; gave up after {retries} retries ({resume})")
            delay = backoff * 2 ** (failures - 1)
            logger.warning("%s: %s; retrying in %.1f s", label, problem, delay)
            time.sleep(delay)
