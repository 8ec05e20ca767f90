/**
 * Signing in: what the server offers (server.json), the dev sign-in (POST /app/dev-token, a dev
 * server only) or a pasted access token, and the sign-in kept for this tab (sessionStorage: a
 * reload stays signed in; another tab may be someone else). The dev sign-in's device id is kept
 * per user in this browser (localStorage), so signing in again is the same device.
 */
import type { Credentials } from "./chat";
import { ID_RE } from "./chat";

export interface ServerSettings {
  ws_port: number | null;
  wss_port: number | null;
  ws_path: string;
  dev_sign_in: boolean;
}

export interface SignIn {
  user: string;
  device: string;
  token?: string; // a pasted token; absent: the dev sign-in mints them
}

const BASE = import.meta.env.BASE_URL; // "/app/"
const KEY = "mqchat.sign-in";

export async function loadServerSettings(): Promise<ServerSettings> {
  const response = await fetch(`${BASE}server.json`, { cache: "no-cache" });
  if (!response.ok) throw new Error(`server.json: HTTP ${response.status}`);
  return (await response.json()) as ServerSettings;
}

/** The MQTT-over-WebSocket URL for this page (wss for an https page), or null when the
 * server opens no such listener. */
export function websocketUrl(settings: ServerSettings, page: Location = location): string | null {
  const secure = page.protocol === "https:";
  const port = secure ? settings.wss_port : settings.ws_port;
  if (port === null) return null;
  return `${secure ? "wss" : "ws"}://${page.hostname}:${port}${settings.ws_path}`;
}

export function savedSignIn(): SignIn | null {
  try {
    const saved = JSON.parse(sessionStorage.getItem(KEY) ?? "null") as SignIn | null;
    return saved && ID_RE.test(saved.user) && ID_RE.test(saved.device) ? saved : null;
  } catch {
    return null;
  }
}

export function saveSignIn(signIn: SignIn): void {
  sessionStorage.setItem(KEY, JSON.stringify(signIn));
  localStorage.setItem(`${KEY}.last-user`, signIn.user);
  // A pasted token names its own device; the dev sign-in's is this browser's for the user.
  if (signIn.token === undefined) localStorage.setItem(deviceKey(signIn.user), signIn.device);
}

export function forgetSignIn(): void {
  sessionStorage.removeItem(KEY);
}

export function lastUser(): string {
  return localStorage.getItem(`${KEY}.last-user`) ?? "";
}

function deviceKey(user: string): string {
  return `${KEY}.device.${user}`;
}

/** The device id this browser signs in with as user: the one it used before, or a new one. */
export function deviceIdFor(user: string): string {
  const kept = ID_RE.test(user) ? localStorage.getItem(deviceKey(user)) : null;
  return kept !== null && ID_RE.test(kept) ? kept : newDeviceId();
}

/** A new device id: 8 random bytes, unique in the deployment (a device id is an MQTT client id). */
export function newDeviceId(): string {
  const random = crypto.getRandomValues(new Uint8Array(8));
  return `web-${Array.from(random, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

export class SignInError extends Error {}

/** A token from the dev sign-in. */
export async function devToken(user: string, device: string): Promise<Credentials> {
  const response = await fetch(`${BASE}dev-token`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user, device }),
  });
  if (response.status === 404) {
    throw new SignInError("this server has no dev sign-in (it runs with a configured secret)");
  }
  const body = (await response.json().catch(() => ({}))) as Record<string, unknown>;
  if (!response.ok) throw new SignInError(String(body.message ?? `HTTP ${response.status}`));
  return { token: String(body.token), expiresIn: Number(body.expires_in) };
}

/** Where a Chat gets its tokens for this sign-in. */
export function credentialsFor(signIn: SignIn): () => Promise<Credentials> {
  const pasted = signIn.token;
  if (pasted !== undefined) {
    // Asking again gives the same token: never renewed (the server ends the sign-in at its exp).
    return () => Promise.resolve({ token: pasted, expiresIn: null });
  }
  return () => devToken(signIn.user, signIn.device);
}

/** The claims of an access token (not verified: the server does that). */
export function tokenClaims(token: string): { sub: string; dev: string; exp?: number } | null {
  const part = token.split(".")[1];
  if (!part) return null;
  try {
    const json = atob(part.replace(/-/g, "+").replace(/_/g, "/"));
    const claims = JSON.parse(json) as Record<string, unknown>;
    if (typeof claims.sub !== "string" || typeof claims.dev !== "string") return null;
    return { sub: claims.sub, dev: claims.dev, ...(typeof claims.exp === "number" ? { exp: claims.exp } : {}) };
  } catch {
    return null;
  }
}
