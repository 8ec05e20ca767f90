/**
 * The web chat served by `mqchat serve` under /app: sign in (the dev sign-in, or a pasted
 * token), then the conversations of that user. All protocol work is in chat.ts.
 */
import "./style.css";
import { Chat } from "./chat";
import type { ServerSettings, SignIn } from "./session";
import { credentialsFor, forgetSignIn, loadServerSettings, saveSignIn, savedSignIn, websocketUrl } from "./session";
import { State } from "./state";
import { ChatView } from "./ui/chatview";
import { h } from "./ui/dom";
import { signInView } from "./ui/signin";

const root = document.getElementById("app") as HTMLElement;

function showSignIn(settings: ServerSettings, notice = ""): void {
  const wsUrl = websocketUrl(settings);
  root.replaceChildren(
    signInView(
      settings,
      wsUrl,
      (signIn) => {
        saveSignIn(signIn);
        void startChat(settings, signIn);
      },
      notice,
    ),
  );
  root.querySelector<HTMLElement>("input, textarea")?.focus();
}

async function startChat(settings: ServerSettings, signIn: SignIn): Promise<void> {
  const wsUrl = websocketUrl(settings);
  if (!wsUrl) return showSignIn(settings);
  const chat = new Chat({
    user: signIn.user,
    device: signIn.device,
    wsUrl,
    httpBase: "",
    credentials: credentialsFor(signIn),
  });
  const state = new State(chat);
  const view = new ChatView(chat, state, () => {
    forgetSignIn();
    void chat.stop().finally(() => location.reload());
  });
  chat.on("ended", (why) => {
    // The server refused the credentials for good (expired, revoked): sign in again.
    forgetSignIn();
    void chat.stop().finally(() => showSignIn(settings, why));
  });
  root.replaceChildren(view.element);
  try {
    await chat.start();
  } catch {
    forgetSignIn(); // no token for this sign-in (the server changed mode?): sign in again
    await chat.stop();
    showSignIn(settings, "The server did not take this sign-in, or cannot be reached: sign in again.");
  }
}

async function main(): Promise<void> {
  let settings: ServerSettings;
  try {
    settings = await loadServerSettings();
  } catch {
    const error = h("p", { class: "error", role: "alert" }, "The mqchat server cannot be reached.");
    root.replaceChildren(h("main", { class: "sign-in" }, error));
    return;
  }
  const saved = savedSignIn();
  if (saved) await startChat(settings, saved);
  else showSignIn(settings);
}

void main();
