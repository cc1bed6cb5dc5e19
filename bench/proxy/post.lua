-- wrk script: POST one OpenAI completion request, streamed or not.
-- BENCH_STREAM=1 asks for a stream; BENCH_TOKENS sets max_tokens.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local stream = os.getenv("BENCH_STREAM") == "1"
local tokens = os.getenv("BENCH_TOKENS") or "16"
wrk.body = '{"model": "bench", "prompt": "The quick brown fox jumps over the lazy dog", '
  .. '"max_tokens": ' .. tokens .. ', "temperature": 0, "stream": '
  .. (stream and "true" or "false") .. '}'
