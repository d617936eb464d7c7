"""``/v1/models``: the one model this gateway serves."""

from __future__ import annotations

from fastapi import APIRouter

from ..errors import APIError, doc, documented
from ..schemas import ModelCard, ModelList
from ..state import Authorized, GatewayState, State

router = APIRouter(tags=["chat"])


def model_not_found(state: GatewayState, name: str, param: str | None) -> APIError:
    cfg = state.config
    also = ", ".join(repr(a) for a in cfg.model_aliases if a != cfg.model_name)
    served = f"'{cfg.model_name}'" + (f" (also accepted as {also})" if also else "")
    base, at, _version = name.partition("@")
    if at and base in state.known_models:
        # a named policy version: the policy serves one version at a time, the current one
        message = (
            f"The model '{name}' is not served: only the current version of '{base}' is served; "
            f"send model '{base}' (each response's policy_version names the version that answered)"
        )
    else:
        message = f"The model '{name}' does not exist: this gateway serves {served}"
    return APIError(
        404,
        message,
        type="invalid_request_error",
        param=param,
        code="model_not_found",
    )


@router.get("/v1/models", response_model=ModelList, responses=documented())
async def list_models(client: Authorized, state: State) -> ModelList:
    """The one model this gateway serves (for clients that list models first)."""
    return ModelList(data=[ModelCard(id=state.config.model_name, created=0, owned_by="palm-rlhf")])


@router.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    responses={**documented(), 404: doc(404, "Unknown model (code model_not_found)")},
)
async def retrieve_model(model_id: str, client: Authorized, state: State) -> ModelCard:
    """The served model, by its id or an alias; any other id is a 404 ``model_not_found``."""
    if model_id not in state.known_models:
        raise model_not_found(state, model_id, "model")
    return ModelCard(id=model_id, created=0, owned_by="palm-rlhf")
