"""Request and response bodies of the HTTP API (they define the served OpenAPI schema).

The chat-completions shapes follow OpenAI's so that its clients work unchanged; the gateway's
additions (``best_of``, per-choice ``reward``, ``policy_version``, ``reward_version``,
``palm_rlhf.dropped_turns``) are extra
fields those clients pass through (``extra_body``) or ignore.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

MAX_N = 16  # choices / candidates per request: best-of-n beyond this costs more than it buys


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


MAX_CONTENT = 32_768  # characters of one message's text
PART_SEPARATOR = "\n"  # between the texts of consecutive content parts

# the JSON schema of ``content``: a string, or an array of text parts as current OpenAI clients
# send it (the request model itself holds the joined text, see ChatMessage._join_parts)
_CONTENT_SCHEMA = {
    "anyOf": [
        {"type": "string", "maxLength": MAX_CONTENT},
        {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
                "required": ["type", "text"],
            },
        },
    ],
    "title": "Content",
    "description": "Text, or an array of text parts (joined with a newline); other part types "
    "(image_url, input_audio, file, ...) are refused with a 400.",
}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_CONTENT), WithJsonSchema(_CONTENT_SCHEMA, mode="validation")]
    name: str | None = Field(default=None, max_length=64)

    @field_validator("content", mode="before")
    @classmethod
    def _join_parts(cls, v: Any) -> Any:
        """An array of content parts becomes its texts joined with PART_SEPARATOR; this text-only
        model refuses any other part type with a message naming it."""
        if not isinstance(v, list):
            return v
        if not v:
            raise ValueError("content must be a string or a non-empty array of content parts")
        texts = []
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str):
                # ValueError, not TypeError: pydantic reports only the former as a validation error
                raise ValueError(f"content part {i} must be an object with a 'type'")  # noqa: TRY004
            if kind != "text":
                raise ValueError(
                    f"content part {i} has type {kind!r}, which this text-only model cannot read; "
                    "send the content as a string or as parts of type 'text'"
                )
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} of type 'text' needs a string 'text'")  # noqa: TRY004
            texts.append(part["text"])
        return PART_SEPARATOR.join(texts)


class StreamOptions(BaseModel):
    include_usage: bool = False


MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI allows
MAX_STOP_TOKEN_IDS = 16


class SamplingRequest(BaseModel):
    """The fields chat completions and (legacy) completions share: the model, best-of-n, and
    the sampling controls, each passed through to the policy's sampler."""

    # OpenAI clients send fields this gateway does not use (user, metadata, store, ...): ignore
    # them rather than fail; but parameters that would change the answer and that the model
    # cannot honour (tools, response_format, ...) are refused, naming them.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(
        default="palm-rlhf",
        max_length=256,
        description="The served model (GET /v1/models) or an alias of it; any other name is a 404 "
        "with code model_not_found. Echoed in the response and recorded.",
    )
    n: int = Field(default=1, ge=1, le=MAX_N, description="Choices returned, best reward first.")
    best_of: int | None = Field(
        default=None,
        ge=1,
        le=MAX_N,
        description="Candidates generated and ranked by the reward service (>= n; default n).",
    )
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 is greedy decoding.")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(
        default=None,
        ge=0,
        le=2**31 - 1,
        description="Sample only from the k most likely tokens (0 or null: off; 1 is greedy). Not an "
        "OpenAI field: the openai client sends it in extra_body.",
    )
    min_p: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Keep only tokens at least min_p times as likely as the most likely one (after "
        "temperature; 0 or null: off). Not an OpenAI field (extra_body).",
    )
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop sequences.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(
        default=None, ge=-2, le=2, description="Subtracted from the logit of every token already generated."
    )
    frequency_penalty: float | None = Field(
        default=None, ge=-2, le=2, description="Subtracted from a token's logit once per time it was generated."
    )
    repetition_penalty: float | None = Field(
        default=None,
        gt=0,
        le=10,
        description="Logits of tokens in the prompt or generated are divided by it (if positive) or "
        "multiplied by it (1 or null: off). Not an OpenAI field (extra_body).",
    )
    logit_bias: dict[str, float] | None = Field(
        default=None,
        description="Token id (as a string) -> bias in [-100, 100] added to its logit; -100 bans the token.",
    )
    min_tokens: int | None = Field(
        default=None,
        ge=0,
        le=4096,
        description="No end of text, stop token or stop sequence before this many tokens. Not an OpenAI "
        "field (extra_body).",
    )
    stop_token_ids: list[int] | None = Field(
        default=None,
        max_length=MAX_STOP_TOKEN_IDS,
        description="Token ids that end a choice (besides the end-of-text token). Not an OpenAI field "
        "(extra_body).",
    )
    ignore_eos: bool = Field(
        default=False,
        description="Keep generating past the end-of-text token (until max_tokens, a stop token id or a "
        "stop sequence). Not an OpenAI field (extra_body).",
    )

    @field_validator("logit_bias", mode="after")
    @classmethod
    def _token_biases(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids written as strings, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {key} must be in [-100, 100], got {bias}")
        if v is not None and len(v) > 300:
            raise ValueError(f"at most 300 token biases are allowed, got {len(v)}")
        return v

    @field_validator("stop_token_ids", mode="after")
    @classmethod
    def _token_ids(cls, v: list[int] | None) -> list[int] | None:
        if v and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        stops = self.stop_list()
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed, got {len(stops)}")
        if any(not s or len(s) > 64 for s in stops):
            raise ValueError("stop sequences must be non-empty and at most 64 characters")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def logit_bias_ids(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Most tokens per answer; default: the room the prompt leaves in the model's context "
        "(within the policy's limit).",
    )
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096, description="Alias of max_tokens.")
    logprobs: bool | None = Field(
        default=None,
        description="Return each answer token's log-probability under the model's own distribution "
        "(temperature 1, before penalties, bias and filtering).",
    )
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="With logprobs: also the most likely tokens at each position, with their log-probabilities.",
    )
    # OpenAI parameters the model cannot honour: accepted only with their "off" value, so that a
    # client relying on them gets a 400 naming the parameter rather than a silently different answer
    tools: list[dict[str, Any]] | None = Field(default=None, description="Not supported: only [] or null.")
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, description='Not supported: only "none" or null.'
    )
    functions: list[dict[str, Any]] | None = Field(
        default=None, description="Not supported: only [] or null."
    )
    function_call: str | dict[str, Any] | None = Field(
        default=None, description='Not supported: only "none" or null.'
    )
    response_format: dict[str, Any] | None = Field(
        default=None, description='Only {"type": "text"} (or null): the model writes plain text.'
    )
    modalities: list[str] | None = Field(default=None, description='Only ["text"] (or null).')
    audio: dict[str, Any] | None = Field(default=None, description="Not supported: only null.")

    @field_validator("modalities", mode="before")
    @classmethod
    def _text_modality(cls, v: Any) -> Any:
        if v is None or v == ["text"]:
            return v
        raise ValueError(f"{v!r} is not supported: this model writes text only (only ['text'] is accepted)")

    @field_validator("audio", mode="before")
    @classmethod
    def _no_audio(cls, v: Any) -> Any:
        if v is None:
            return v
        raise ValueError("not supported: this model writes text only (only null is accepted)")

    @field_validator("tools", "functions", mode="before")
    @classmethod
    def _no_tools(cls, v: Any) -> Any:
        # the error handler prefixes each message with the parameter's name
        if v is None or v == []:
            return v
        raise ValueError(
            "not supported: this model cannot call tools or functions (only [] or null is accepted)"
        )

    @field_validator("tool_choice", "function_call", mode="before")
    @classmethod
    def _no_tool_choice(cls, v: Any) -> Any:
        if v is None or v == "none":
            return v
        raise ValueError(
            f"{v!r} is not supported: this model cannot call tools or functions (only 'none' is accepted)"
        )

    @field_validator("response_format", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if v is None or v == {"type": "text"}:
            return v
        kind = v.get("type") if isinstance(v, dict) else v
        raise ValueError(
            f"type {kind!r} is not supported: this model writes plain text (only {{'type': 'text'}} is accepted)"
        )

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    def top_n(self) -> int:
        """Alternatives per token to ask the policy for."""
        return (self.top_logprobs or 0) if self.logprobs else 0


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions`` (OpenAI's legacy completions): raw text prompts, no chat format."""

    prompt: str | list[str] = Field(
        description="A prompt, or a list of up to 16 prompts (each gets n choices), completed as raw text."
    )
    max_tokens: int | None = Field(default=16, ge=1, le=4096, description="Most tokens per choice (default 16).")
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="Return each token's log-probability and this many most likely alternatives per position.",
    )
    echo: bool = Field(default=False, description="Not supported: only false.")
    suffix: str | None = Field(default=None, description="Not supported: only null (the model does not insert).")

    @field_validator("prompt", mode="after")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> str | list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts or len(prompts) > 16:
            raise ValueError("give a prompt string or a list of 1 to 16 prompt strings")
        if any(not p or len(p) > MAX_CONTENT for p in prompts):
            raise ValueError(f"prompts must be non-empty and at most {MAX_CONTENT} characters")
        return v

    @field_validator("echo", mode="before")
    @classmethod
    def _no_echo(cls, v: Any) -> Any:
        if v is None or v is False:
            return False
        raise ValueError("not supported: the prompt is not echoed (only false is accepted)")

    @field_validator("suffix", mode="before")
    @classmethod
    def _no_suffix(cls, v: Any) -> Any:
        if v is None:
            return v
        raise ValueError("not supported: this model only appends text (only null is accepted)")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    reward: float | None = Field(description="The reward service's score of this answer.")
    logprobs: ChoiceLogprobs | None = Field(
        default=None,
        description="With logprobs: every generated token of the candidate (including white space the "
        "answer's text trims), its log-probability under the model's own distribution, and the most likely "
        "alternatives.",
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="Tokens generated over all best_of candidates.")
    total_tokens: int


class GatewayExtras(BaseModel):
    """This gateway's own report on a completion (OpenAI clients pass it through unread)."""

    dropped_turns: int = Field(
        default=0,
        description="Messages left out of the prompt, oldest first, so that the conversation fits the "
        "model's context (also in the X-Palm-Rlhf-Dropped-Turns header).",
    )


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    policy_version: str
    reward_version: str
    best_of: int
    system_fingerprint: str | None = None
    palm_rlhf: GatewayExtras = Field(default_factory=GatewayExtras)


class FeedbackRequest(BaseModel):
    """Exactly one of: ``thumbs`` (with choice_index), ``rating`` (with choice_index), or
    ``preferred_index`` + ``rejected_index``. Indices name candidates in rank order: 0..n-1
    are the returned choices, n..best_of-1 the candidates that were not returned."""

    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1, max_length=128)
    choice_index: int | None = None
    thumbs: Literal["up", "down"] | None = None
    rating: int | None = Field(default=None, ge=1, le=5)
    preferred_index: int | None = None
    rejected_index: int | None = None
    comment: str | None = Field(default=None, max_length=4000)

    @model_validator(mode="after")
    def _one_kind(self) -> FeedbackRequest:
        kinds = [k for k in ("thumbs", "rating") if getattr(self, k) is not None]
        pref = self.preferred_index is not None or self.rejected_index is not None
        if pref:
            kinds.append("preference")
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one kind of feedback: thumbs, rating, or preferred_index + rejected_index"
                + (f" (got {', '.join(kinds)})" if kinds else "")
            )
        if kinds[0] in ("thumbs", "rating") and self.choice_index is None:
            raise ValueError(f"{kinds[0]} feedback needs choice_index")
        if kinds[0] == "preference":
            if self.preferred_index is None or self.rejected_index is None:
                raise ValueError("preference feedback needs both preferred_index and rejected_index")
            if self.choice_index is not None:
                raise ValueError("choice_index is not used with preference feedback")
            if self.preferred_index == self.rejected_index:
                raise ValueError("preferred_index and rejected_index must differ")
        return self

    @property
    def kind(self) -> str:
        if self.thumbs is not None:
            return "thumbs"
        if self.rating is not None:
            return "rating"
        return "preference"


class FeedbackResponse(BaseModel):
    id: int
    object: Literal["feedback"] = "feedback"
    completion_id: str
    kind: Literal["thumbs", "rating", "preference"]
    choice_index: int | None = None
    thumbs: Literal["up", "down"] | None = None
    rating: int | None = None
    preferred_index: int | None = None
    rejected_index: int | None = None
    comment: str | None = None
    created: float


class FeedbackList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FeedbackResponse]


class CandidateView(BaseModel):
    index: int
    text: str
    reward: float | None
    finish_reason: str
    shown: bool


class CompletionView(BaseModel):
    id: str
    object: Literal["chat.completion.record"] = "chat.completion.record"
    created: float
    model: str
    messages: list[dict[str, Any]]
    n: int
    best_of: int
    policy_version: str
    reward_version: str
    candidates: list[CandidateView]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    backends: dict[str, str]
    store: str


class NotReady(ErrorResponse):
    backends: dict[str, str]
    store: str


class LegacyLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int] = Field(description="Character offset of each token in prompt + completion.")


class CompletionChoice(BaseModel):
    text: str
    index: int = Field(description="prompt index x n + rank: the best choice of each prompt first.")
    logprobs: LegacyLogprobs | None = None
    finish_reason: Literal["stop", "length"]
    reward: float | None = Field(description="The reward service's score of this text.")


class CompletionExtras(BaseModel):
    completion_ids: list[str] = Field(
        description="The stored completion of each prompt, in prompt order (feedback takes these ids; "
        "with one prompt it is the response id)."
    )


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    policy_version: str
    reward_version: str
    best_of: int
    system_fingerprint: str | None = None
    palm_rlhf: CompletionExtras
