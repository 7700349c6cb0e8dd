// Opens a `heedful report` HTML file in headless Chromium (driven by playwright-core) for
// tests/integration/test_report.py: collects console errors, page errors and any request that is not the
// file itself, measures every [data-plot] element and keeps a full-page screenshot.
//
// Usage: node report_page.mjs <report.html> <screenshot path>
// Environment: HEEDFUL_NODE_MODULES (where playwright-core is), HEEDFUL_CHROMIUM (the browser binary).
// Prints ONE JSON line on stdout: {errors, requests, plots: [{name, title, width, height}]}.
import { createRequire } from "node:module";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [file, screenshot] = process.argv.slice(2);
const require = createRequire(path.join(process.env.HEEDFUL_NODE_MODULES, "noop.js"));
const { chromium } = require("playwright-core");

const browser = await chromium.launch({
  executablePath: process.env.HEEDFUL_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  const errors = [];
  const requests = [];
  const url = pathToFileURL(path.resolve(file)).href;
  page.on("console", (msg) => {
    if (msg.type() === "error") errors.push(msg.text());
  });
  page.on("pageerror", (error) => errors.push(String(error)));
  page.on("request", (request) => {
    if (request.url() !== url) requests.push(request.url());
  });
  await page.goto(url, { waitUntil: "load" });
  const plots = await page.$$eval("[data-plot]", (elements) =>
    elements.map((element) => {
      const box = element.getBoundingClientRect();
      const title = element.querySelector(":scope > title");
      return {
        name: element.getAttribute("data-plot"),
        title: title ? title.textContent : "",
        width: box.width,
        height: box.height,
      };
    }),
  );
  await page.screenshot({ path: screenshot, fullPage: true });
  process.stdout.write(`${JSON.stringify({ errors, requests, plots })}\n`);
} finally {
  await browser.close();
}
