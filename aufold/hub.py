"""Pushing an edited checkpoint folder to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

# huggingface_hub 2.x makes its requests with httpx2 and lets its network errors through.
import httpx2
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

from aufold.errors import AufoldError
from aufold.safety.outputs import marker_ignore_patterns


def check_push_target(repo_id: str) -> None:
    """Refuse a push that cannot succeed before any work is done: a malformed repo id,
    offline mode, or no token. (Whether the token may write there only the Hub can say.)"""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise AufoldError(f"invalid repo id {repo_id!r} for --push-to-hub: use `name` or "
                          f"`namespace/name` made of letters, digits, '-', '_' and '.'") from None
    if constants.HF_HUB_OFFLINE:
        raise AufoldError("cannot push while HF_HUB_OFFLINE is set; unset it to push, or drop "
                          "--push-to-hub")
    if get_token() is None:
        raise AufoldError("no Hugging Face token for --push-to-hub; log in with `hf auth login` "
                          "or set HF_TOKEN to a token with write access")


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload model edited with aufold",
) -> str:
    """Upload every file of a folder to a model repo on the Hub and return the commit URL.

    The repo is created first when it does not exist; ``private`` only applies then, since
    an existing repo keeps its visibility. Without ``token``, huggingface_hub looks for one
    as usual: the HF_TOKEN environment variable, then the login saved by ``hf auth login``.
    Every failure to reach or use the Hub is raised as an AufoldError whose one-line message
    names the problem and the fix and never contains the token.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AufoldError(f"cannot push {folder}: not a folder; pass the folder that aufold wrote")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        # A checkpoint holds far fewer files than upload_folder puts in one commit.
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message,
            ignore_patterns=marker_ignore_patterns(),
        )
    except HFValidationError as err:
        raise AufoldError(
            f"invalid repo id {repo_id!r}: use `name` or `namespace/name` made of letters, "
            "digits, '-', '_' and '.'"
        ) from err
    except HfHubHTTPError as err:
        raise AufoldError(_http_error_message(err.response.status_code, repo_id)) from err
    except OfflineModeIsEnabled as err:
        raise AufoldError("cannot push while HF_HUB_OFFLINE is set; unset it to push") from err
    except httpx2.TransportError as err:
        raise AufoldError(
            f"cannot reach the Hugging Face Hub at {api.endpoint} ({type(err).__name__}); "
            "check the network connection (and HF_ENDPOINT if set), then try again"
        ) from err
    return commit.commit_url


def _http_error_message(status: int, repo_id: str) -> str:
    """Return the one-line message for an HTTP error status that the Hub answered.

    The server's own text is left out on purpose: it is not ours to vouch for, and the
    message must never be able to echo the credentials back.
    """
    if status == 401:
        return (
            f"the Hugging Face Hub refused the credentials for pushing to {repo_id} (HTTP 401); "
            "log in with `hf auth login` or set HF_TOKEN to a token with write access"
        )
    if status == 403:
        return (
            f"the token may not write to {repo_id} (HTTP 403); use a token with write access "
            "to its namespace (`hf auth login` or HF_TOKEN)"
        )
    if status == 404:
        return (
            f"the Hugging Face Hub has no repo {repo_id} that this token can write to "
            "(HTTP 404); check the repo id"
        )
    return (
        f"the Hugging Face Hub refused the push to {repo_id} (HTTP {status}); "
        "check the repo id and try again later"
    )
