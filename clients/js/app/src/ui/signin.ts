/** The sign-in screen: a user and a device name on a dev server, an access token elsewhere. */
import { ID_PATTERN } from "../chat";
import type { ServerSettings, SignIn } from "../session";
import { deviceIdFor, devToken, lastUser, SignInError, tokenClaims } from "../session";
import { h } from "./dom";

export function signInView(
  settings: ServerSettings,
  wsUrl: string | null,
  onSignedIn: (signIn: SignIn) => void,
  notice = "",
): HTMLElement {
  const error = h("p", { class: "error", role: "alert" }, notice);
  const fail = (message: string): void => {
    error.textContent = message;
  };
  const noWebSocket = wsUrl
    ? null
    : h(
        "p",
        { class: "notice", role: "alert" },
        "This server opens no MQTT-over-WebSocket listener, which the web chat needs: start it with ",
        h("code", {}, "--ws-port 8081"),
        " (",
        h("code", {}, "make serve"),
        " does).",
      );

  let form: HTMLFormElement;
  if (settings.dev_sign_in) {
    const user = h("input", {
      id: "sign-in-user",
      name: "user",
      required: true,
      autocomplete: "username",
      pattern: ID_PATTERN,
      value: lastUser(),
    });
    const device = h("input", {
      id: "sign-in-device",
      name: "device",
      required: true,
      pattern: ID_PATTERN,
      value: deviceIdFor(user.value),
    });
    let deviceEdited = false;
    device.addEventListener("input", () => (deviceEdited = true));
    user.addEventListener("input", () => {
      if (!deviceEdited) device.value = deviceIdFor(user.value.trim());
    });
    form = h(
      "form",
      { class: "card", "aria-labelledby": "sign-in-title" },
      h("h1", { id: "sign-in-title" }, "Sign in to mqchat"),
      h("p", { class: "hint" }, "Dev server: any user name signs in, with a token the server signs for you."),
      h("label", { for: "sign-in-user" }, "User"),
      user,
      h("label", { for: "sign-in-device" }, "Device"),
      device,
      h("p", { class: "hint" }, "A device id is unique in the whole deployment: this browser keeps one per user (one tab at a time)."),
      noWebSocket,
      error,
      h("button", { type: "submit", disabled: !wsUrl }, "Sign in"),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const signIn = { user: user.value.trim(), device: device.value.trim() };
      devToken(signIn.user, signIn.device)
        .then(() => onSignedIn(signIn))
        .catch((e: unknown) => fail(e instanceof SignInError ? e.message : "the server cannot be reached"));
    });
  } else {
    const token = h("textarea", { id: "sign-in-token", name: "token", required: true, rows: 4, spellcheck: false });
    form = h(
      "form",
      { class: "card", "aria-labelledby": "sign-in-title" },
      h("h1", { id: "sign-in-title" }, "Sign in to mqchat"),
      h(
        "p",
        { class: "hint" },
        "This server runs with a configured secret: paste an access token from your auth service (or mqchat token).",
      ),
      h("label", { for: "sign-in-token" }, "Access token"),
      token,
      noWebSocket,
      error,
      h("button", { type: "submit", disabled: !wsUrl }, "Sign in"),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const pasted = token.value.trim();
      const claims = tokenClaims(pasted);
      if (!claims) return fail("that is not an access token (a JWT with sub and dev claims)");
      onSignedIn({ user: claims.sub, device: claims.dev, token: pasted });
    });
  }
  return h("main", { class: "sign-in" }, form);
}
