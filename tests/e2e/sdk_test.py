#!/usr/bin/env python3
"""End-to-end: the official `openai` and `anthropic` Python SDKs against `moeserve serve`
(built-in tiny model). usage: sdk_test.py PATH_TO_MOESERVE_BINARY"""
import sys

import anthropic
import openai

import server

KEY = "sk-e2e"


def check_openai(base):
    c = openai.OpenAI(base_url=base + "/v1", api_key=KEY)
    models = c.models.list()
    name = models.data[0].id
    r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, seed=1)
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens == 6 and r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    chunks = list(c.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                            seed=1, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content, (text, r.choices[0].message.content)
    assert chunks[-1].usage.completion_tokens == 6
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    t = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "Weather?"}], tools=[tool], max_tokens=3)
    assert t.usage.prompt_tokens > r.usage.prompt_tokens and t.choices[0].finish_reason in ("length", "stop", "tool_calls")
    comp = c.completions.create(model=name, prompt="The", max_tokens=4)
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 4
    for bad, exc in [({"model": "gpt-4"}, openai.NotFoundError), ({"max_tokens": 10**6}, openai.BadRequestError),
                     ({"temperature": -1}, openai.BadRequestError)]:
        args = {"model": name, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **bad}
        try:
            c.chat.completions.create(**args)
            raise AssertionError(f"{bad} accepted")
        except exc as e:
            assert e.body and e.body.get("message"), e.body
    try:
        openai.OpenAI(base_url=base + "/v1", api_key="wrong").models.list()
        raise AssertionError("wrong key accepted")
    except openai.AuthenticationError:
        pass
    print("openai sdk: ok")
    return name


def check_anthropic(base, name):
    c = anthropic.Anthropic(base_url=base, api_key=KEY)
    m = c.messages.create(model=name, max_tokens=5, system="Be brief.", messages=[{"role": "user", "content": "Hello"}])
    assert m.role == "assistant" and m.stop_reason == "max_tokens" and m.usage.output_tokens == 5
    text = "".join(b.text for b in m.content if b.type == "text")
    with c.messages.stream(model=name, max_tokens=5, system="Be brief.", messages=[{"role": "user", "content": "Hello"}]) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 5
    assert isinstance(streamed, str)
    tool = {"name": "get_weather", "description": "Weather of a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    t = c.messages.create(model=name, max_tokens=3, tools=[tool], messages=[{"role": "user", "content": "Weather?"}])
    assert t.usage.input_tokens > m.usage.input_tokens
    n = c.messages.count_tokens(model=name, messages=[{"role": "user", "content": "Hello"}])
    assert n.input_tokens > 0
    try:
        c.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "Hello"}])
        raise AssertionError("unknown model accepted")
    except anthropic.NotFoundError:
        pass
    try:
        anthropic.Anthropic(base_url=base, api_key="wrong").messages.create(model=name, max_tokens=2, messages=[{"role": "user", "content": "x"}])
        raise AssertionError("wrong key accepted")
    except anthropic.AuthenticationError:
        pass
    print("anthropic sdk: ok", repr(text[:20]))


def main():
    p, base = server.start(sys.argv[1], "--api-key", KEY)
    try:
        name = check_openai(base)
        check_anthropic(base, name)
    finally:
        p.terminate()
        p.wait(timeout=30)
    print("e2e sdk tests passed")


if __name__ == "__main__":
    main()
