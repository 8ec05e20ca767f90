/**
 * Time, injected: every wait of the SDK (reconnect backoff, outbox resends, the gap grace, HTTP
 * retries) goes through a Clock, so tests drive them without sleeping.
 *
 * Backoff is exponential with full jitter (protocol section 8):
 * `delay = random(0, min(30 s, 1 s × 2^attempt))`, attempt counted from 0 and reset once a
 * connection succeeds.
 */

import { ClientClosed } from "./errors.js";
import { clearTimer, monotonicMs, setTimer, type AbortSignalLike } from "./platform.js";

export interface Clock {
  /** Milliseconds from a monotonic source. */
  now(): number;
  /** Call fn once after ms; the handle cancels it. */
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export const systemClock: Clock = {
  now: monotonicMs,
  setTimeout: setTimer,
  clearTimeout: clearTimer,
};

export const BACKOFF_FIRST_MS = 1000;
export const BACKOFF_CAP_MS = 30_000;

/** The delay before reconnect `attempt` (0-based): full jitter over `min(cap, first × 2^attempt)`.
 * `random` returns a number in [0, 1), as Math.random does. */
export function backoffDelayMs(
  attempt: number,
  random: () => number = Math.random,
  firstMs: number = BACKOFF_FIRST_MS,
  capMs: number = BACKOFF_CAP_MS,
): number {
  return random() * Math.min(capMs, firstMs * 2 ** Math.min(Math.max(attempt, 0), 32));
}

/** Wait ms on the clock; rejects with ClientClosed when the signal aborts first. */
export function sleep(clock: Clock, ms: number, signal?: AbortSignalLike): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(new ClientClosed("the client is closed"));
      return;
    }
    const onAbort = (): void => {
      clock.clearTimeout(handle);
      reject(new ClientClosed("the client is closed"));
    };
    const handle = clock.setTimeout(
      () => {
        signal?.removeEventListener("abort", onAbort);
        resolve();
      },
      Math.max(0, ms),
    );
    signal?.addEventListener("abort", onAbort);
  });
}
