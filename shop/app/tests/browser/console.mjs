// The admin console in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven
// by playwright-core over CDP. Run by shop-app's test `the_console_works_in_a_real_browser`,
// which starts the shop, makes a stuck saga and a dead letter, and passes everything in the
// environment. Never `playwright install`: the browser is the system's.
//
//   CONSOLE_BASE=http://127.0.0.1:PORT ADMIN_EMAIL=… ADMIN_PASSWORD=… CUSTOMER_TOKEN=…
//   PRODUCT_ID=… SAGA_ID=… DEAD_LETTER_ID=… DEAD_LETTER_GROUP=… SCREENSHOTS=DIR node console.mjs
//
// Exits 0 when every step passed; otherwise prints the failed step and exits 1.
import { chromium } from "playwright-core";
import path from "node:path";

const env = (name) => {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set`);
  }
  return value;
};

const base = env("CONSOLE_BASE");
const screenshots = env("SCREENSHOTS");
const sagaId = env("SAGA_ID");
const letterId = env("DEAD_LETTER_ID");
const group = env("DEAD_LETTER_GROUP");

let step = "starting";
const log = (text) => console.log(`[console.mjs] ${text}`);
const begin = (name) => {
  step = name;
  log(name);
};
const check = (condition, message) => {
  if (!condition) {
    throw new Error(message);
  }
};
const shot = (page, name) =>
  page.screenshot({ path: path.join(screenshots, `${name}.png`), fullPage: true });

async function placeOrder() {
  const response = await fetch(`${base}/api/orders`, {
    method: "POST",
    headers: {
      authorization: `Bearer ${env("CUSTOMER_TOKEN")}`,
      "content-type": "application/json",
      "idempotency-key": crypto.randomUUID(),
    },
    body: JSON.stringify({ items: [{ product_id: env("PRODUCT_ID"), quantity: 1 }] }),
  });
  return response.status;
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // Root in a container has no user namespace for Chromium's sandbox.
  args: ["--no-sandbox"],
});
const problems = [];
try {
  begin("a stranger is sent to the login page");
  const stranger = await browser.newContext();
  const anonymous = await stranger.newPage();
  await anonymous.goto(`${base}/admin/sagas`);
  check(new URL(anonymous.url()).pathname === "/admin/login", `landed on ${anonymous.url()}`);
  await shot(anonymous, "login");
  await stranger.close();

  begin("a customer's token is refused");
  const customer = await browser.newContext();
  const host = new URL(base);
  await customer.addCookies([
    {
      name: "trellis_admin",
      value: env("CUSTOMER_TOKEN"),
      domain: host.hostname,
      path: "/admin",
      httpOnly: true,
      sameSite: "Strict",
    },
  ]);
  const refused = await (await customer.newPage()).goto(`${base}/admin`);
  check(refused.status() === 403, `a customer got ${refused.status()}`);
  await customer.close();

  begin("the admin signs in");
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.on("console", (message) => {
    // A 4xx page the test asks for on purpose logs "Failed to load resource"; a blocked
    // script or style (the CSP at work on something the console itself sent) does not.
    const text = message.text();
    if (message.type() === "error" && !text.startsWith("Failed to load resource")) {
      problems.push(`browser console: ${text}`);
    }
  });
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  await page.goto(`${base}/admin/login`);
  await page.getByLabel("Email").fill(env("ADMIN_EMAIL"));
  await page.getByLabel("Password").fill(env("ADMIN_PASSWORD"));
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.waitForURL(`${base}/admin`);
  check((await page.locator("h1").innerText()) === "Overview", "the overview after signing in");
  const cookies = await context.cookies();
  const session = cookies.find((cookie) => cookie.name === "trellis_admin");
  check(session && session.httpOnly && session.sameSite === "Strict", "an HttpOnly, SameSite=Strict session");
  check(
    (await page.evaluate(() => document.cookie)).indexOf("trellis_admin") === -1,
    "script cannot read the session",
  );

  begin("the keyboard reaches the skip link first");
  await page.keyboard.press("Tab");
  check(
    (await page.evaluate(() => document.activeElement && document.activeElement.className)) === "skip",
    "the first Tab stop is the skip link",
  );
  await shot(page, "overview");

  begin("find the stuck saga and retry it");
  await page.getByRole("link", { name: "Sagas", exact: true }).click();
  await page.waitForURL(/\/admin\/sagas/);
  await page.getByRole("link", { name: sagaId }).click();
  await page.waitForURL(`${base}/admin/sagas/${sagaId}`);
  check((await page.locator("[data-status]").first().getAttribute("data-status")) === "stuck", "stuck before");
  await shot(page, "saga");
  await page.getByRole("link", { name: "Retry…" }).click();
  await page.waitForURL(/confirm\?action=retry/);
  await shot(page, "saga-confirm");
  await page.getByRole("button", { name: "Retry saga" }).click();
  await page.waitForURL(/done=retry/);
  check(await page.getByText("Retry recorded").isVisible(), "the retry is confirmed on the page");
  const after = await page.locator("[data-status]").first().getAttribute("data-status");
  check(after !== "stuck", `status after retry: ${after}`);

  begin("search sagas by order id");
  await page.goto(`${base}/admin/sagas`);
  await page.getByLabel("Order id").fill("not-an-order");
  await page.getByRole("button", { name: "Show" }).click();
  check(await page.getByText("is not an order id").isVisible(), "a bad order id is explained");
  await shot(page, "sagas");

  begin("replay the dead letter");
  await page.getByRole("link", { name: "Dead letters", exact: true }).click();
  await page.waitForURL(`${base}/admin/dead-letters`);
  await shot(page, "dead-letters");
  await page.getByRole("link", { name: group, exact: true }).click();
  await page.waitForURL(/\/admin\/dead-letters\/group\?/);
  await page.getByRole("link", { name: letterId }).click();
  await page.waitForURL(`${base}/admin/dead-letters/${letterId}`);
  check(await page.getByText("console.checked").first().isVisible(), "the envelope's type");
  await shot(page, "dead-letter");
  await page.getByRole("link", { name: "Replay…" }).click();
  await page.getByRole("button", { name: "Replay" }).click();
  await page.waitForURL(/done=replay/);
  check(await page.getByText("Replayed").isVisible(), "the replay is confirmed on the page");

  begin("turn on the provider outage");
  await page.getByRole("link", { name: "Payment provider", exact: true }).click();
  await page.getByLabel(/Outage/).check();
  await page.getByRole("button", { name: "Apply" }).click();
  await page.waitForURL(/done=provider/);
  check(await page.getByLabel(/Outage/).isChecked(), "the outage is on");
  await shot(page, "provider");

  begin("see the breaker open on the overview");
  await page.getByRole("link", { name: "Overview", exact: true }).click();
  await page.waitForURL(`${base}/admin`);
  const open = page.locator('[data-breaker="payment_provider"][data-state="open"]');
  let seen = false;
  for (let i = 0; i < 90 && !seen; i += 1) {
    await placeOrder();
    seen = (await open.count()) > 0;
    if (!seen) {
      await page.waitForTimeout(500);
    }
  }
  check(seen, "the payment_provider breaker never showed open on the live overview");
  await shot(page, "overview-breaker-open");

  begin("turn the outage off again");
  await page.goto(`${base}/admin/provider`);
  await page.getByLabel(/Outage/).uncheck();
  await page.getByRole("button", { name: "Apply" }).click();
  await page.waitForURL(/done=provider/);

  begin("the audit log names every action and who did it");
  await page.getByRole("link", { name: "Audit log", exact: true }).click();
  const audit = await page.locator("main").innerText();
  for (const action of ["saga.retry", "dead_letter.replay", "provider.update"]) {
    check(audit.includes(action), `${action} in the audit log`);
  }
  check(audit.includes(env("ADMIN_EMAIL")), "the admin's email in the audit log");
  await shot(page, "audit");

  begin("a narrow window needs no sideways scrolling");
  await page.setViewportSize({ width: 360, height: 760 });
  for (const where of ["/admin", "/admin/sagas", "/admin/provider"]) {
    await page.goto(`${base}${where}`);
    const overflow = await page.evaluate(
      () => document.documentElement.scrollWidth - document.documentElement.clientWidth,
    );
    check(overflow <= 1, `${where} is ${overflow}px wider than a 360px window`);
  }
  await page.goto(`${base}/admin`);
  await shot(page, "overview-narrow");

  begin("no script or CSP errors on any page");
  check(problems.length === 0, problems.join("\n"));
  log("every step passed");
} catch (error) {
  console.error(`[console.mjs] FAILED at "${step}": ${error.stack || error}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
