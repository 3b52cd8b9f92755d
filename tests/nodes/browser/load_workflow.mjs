// Load a UI workflow into the real ComfyUI front end in headless Debian chromium (playwright-core).
// Usage: node load_workflow.mjs BASE_URL WORKFLOW.json SCREENSHOT.png QUEUE(0|1)
// Env: PLAYWRIGHT_NODE_MODULES (folder holding playwright-core), CHROMIUM (default /usr/bin/chromium),
//      BROWSER_TIMEOUT_MS (default 120000).
// Prints one JSON line: {ok, frontend_version, node_count, missing, api_prompt (graphToPrompt), queued, prompt_responses, history,
//                        page_text (the DOM's visible text: dialogs, toasts), console_errors, page_errors, screenshot, error}.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';

const [base, workflowPath, screenshot, queueArg] = process.argv.slice(2);
const modules = process.env.PLAYWRIGHT_NODE_MODULES || '';
const timeout = Number(process.env.BROWSER_TIMEOUT_MS || 120000);
const report = {
  ok: false, frontend_version: null, node_count: 0, missing: [], api_prompt: null, queued: false, prompt_responses: [],
  history: {}, page_text: '', console_errors: [], page_errors: [], screenshot: null, error: null,
};

async function serverJson(route) {
  const response = await fetch(base + route);
  return response.json();
}

async function waitQueueDone(before, deadline) {
  // Done when the server's queue is empty and a new history entry exists.
  for (;;) {
    const queue = await serverJson('/queue');
    const busy = queue.queue_running.length + queue.queue_pending.length;
    const hist = await serverJson('/history');
    const fresh = Object.keys(hist).filter((id) => !before.has(id));
    if (busy === 0 && fresh.length > 0) {
      return Object.fromEntries(fresh.map((id) => [id, { status: hist[id].status, outputs: hist[id].outputs }]));
    }
    if (Date.now() > deadline) throw new Error(`queue not empty after ${timeout} ms (${busy} items)`);
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

async function main() {
  const require = createRequire(path.join(modules, 'noop.js'));
  const { chromium } = require('playwright-core');
  const workflow = JSON.parse(readFileSync(workflowPath, 'utf8'));
  const deadline = Date.now() + timeout;
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-dev-shm-usage'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
    page.on('console', (m) => { if (m.type() === 'error') report.console_errors.push(m.text().slice(0, 300)); });
    page.on('pageerror', (e) => report.page_errors.push(String(e).slice(0, 300)));
    page.on('response', async (r) => {
      if (r.request().method() === 'POST' && /\/prompt$/.test(new URL(r.url()).pathname)) {
        let body = null;
        try { body = await r.json(); } catch { body = null; }
        report.prompt_responses.push({ status: r.status(), body });
      }
    });
    await page.goto(base, { timeout });
    await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types, null,
      { timeout });
    const loaded = await page.evaluate(async (wf) => {
      await window.app.loadGraphData(wf);
      const known = window.LiteGraph.registered_node_types;
      const nodes = window.app.graph._nodes ?? window.app.graph.nodes ?? [];
      const api = await window.app.graphToPrompt();
      return {
        apiPrompt: api.output,
        version: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
        nodeCount: nodes.length,
        missing: [...new Set((wf.nodes ?? []).map((n) => n.type).filter((t) => !(t in known)))],
      };
    }, workflow);
    report.frontend_version = loaded.version;
    report.node_count = loaded.nodeCount;
    report.missing = loaded.missing;
    report.api_prompt = loaded.apiPrompt;
    if (queueArg === '1') {
      const before = new Set(Object.keys(await serverJson('/history')));
      await page.evaluate(() => window.app.queuePrompt(0, 1));
      report.queued = true;
      if (!report.prompt_responses.some((r) => r.status !== 200)) {
        report.history = await waitQueueDone(before, deadline);
      }
    }
    await page.waitForTimeout(500); // let the canvas draw the last state
    report.page_text = await page.evaluate(() => document.body.innerText.slice(0, 8000));
    await page.screenshot({ path: screenshot });
    report.screenshot = screenshot;
    report.ok = true;
  } finally {
    await browser.close();
  }
}

try {
  await main();
} catch (e) {
  report.error = String(e?.stack ?? e).slice(0, 2000);
}
console.log(JSON.stringify(report));
process.exit(report.ok ? 0 : 1);
