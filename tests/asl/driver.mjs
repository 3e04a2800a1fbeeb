// Runs a Step Functions definition on aws-local-stepfunctions (an independent
// implementation of the Amazon States Language) for the Rust tests, over stdin/stdout:
//   in:  one line {"engine", "definition", "input", "context", "max_transitions", "retry_ms"},
//        then answers {"id", "ok": result} or {"id", "error", "cause"} to each invocation;
//   out: "@@asl " + {"invoke": id, "state", "function", "payload", "timeout"} for each Task
//        (the lambda:invoke integration: the state's Parameters give FunctionName and
//        Payload, and the result is {"Payload": ...}), then "@@asl " + {"end", "visited",
//        "invocations"}.
import { createInterface } from "node:readline";
import { pathToFileURL } from "node:url";

// Node 20 lacks Promise.withResolvers, which the engine uses.
if (!Promise.withResolvers) {
  Promise.withResolvers = function () {
    let resolve, reject;
    const promise = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    return { promise, resolve, reject };
  };
}

const send = (message) => process.stdout.write("@@asl " + JSON.stringify(message) + "\n");
const lines = createInterface({ input: process.stdin });
const waiting = new Map();
let request = null;
const started = Promise.withResolvers();
lines.on("line", (line) => {
  const message = JSON.parse(line);
  if (request === null) {
    request = message;
    started.resolve();
    return;
  }
  const pending = waiting.get(message.id);
  waiting.delete(message.id);
  if ("ok" in message) {
    pending.resolve({ Payload: message.ok });
  } else {
    const error = new Error(message.cause);
    error.name = message.error;
    pending.reject(error);
  }
});
await started.promise;

const { StateMachine } = await import(pathToFileURL(request.engine).href);

// Every Task state, in Map and Parallel states too, invokes through the test harness; every
// retrier waits retry_ms instead of its IntervalSeconds.
const handlers = {};
const retries = {};
const invocations = {};
let next = 0;
function walk(states) {
  for (const [name, state] of Object.entries(states)) {
    if (state.Retry) retries[name] = request.retry_ms;
    if (state.Type === "Task") {
      handlers[name] = (input) => {
        invocations[name] = (invocations[name] ?? 0) + 1;
        const id = next++;
        const { promise, resolve, reject } = Promise.withResolvers();
        waiting.set(id, { resolve, reject });
        send({
          invoke: id,
          state: name,
          function: input.FunctionName,
          payload: input.Payload,
          timeout: state.TimeoutSeconds ?? 60,
        });
        return promise;
      };
    }
    const inner = state.ItemProcessor ?? state.Iterator;
    if (inner) walk(inner.States);
    for (const branch of state.Branches ?? []) walk(branch.States);
  }
}
walk(request.definition.States);

const machine = new StateMachine(request.definition);
const execution = machine.run(request.input, {
  overrides: { taskResourceLocalHandlers: handlers, retryIntervalOverrides: retries },
  context: request.context,
  noThrowOnAbort: true,
});
const visited = [];
let failure = null;
let aborted = false;
const logs = (async () => {
  for await (const event of execution.eventLogs) {
    if (event.type === "StateEntered") {
      visited.push(event.state.name);
      if (visited.length > request.max_transitions && !aborted) {
        aborted = true;
        execution.abort();
      }
    } else if (event.type === "ExecutionFailed") {
      failure = { error: event.Error, cause: String(event.Cause ?? "") };
    }
  }
})();
let end;
try {
  const output = await execution.result;
  await logs;
  end = aborted
    ? { failed: { error: "Walker.TooManyTransitions", cause: "" } }
    : { succeeded: output };
} catch (e) {
  await logs.catch(() => {});
  end = { failed: failure ?? { error: e.name ?? "Error", cause: String(e.message ?? e) } };
}
send({ end, visited, invocations });
process.exit(0);
