// A Hookline receiver in Node: verifies each request with the `standardwebhooks`
// library (npm install standardwebhooks), skips ids it has already handled, answers 204.
// Run: WEBHOOK_SECRET=whsec_... PORT=8000 node receiver.js
const http = require("node:http");
const { Webhook } = require("standardwebhooks");

const webhook = new Webhook(process.env.WEBHOOK_SECRET); // the subscription's whsec_... secret
const seen = new Set(); // webhook-id values already handled; keep these in your database

http
  .createServer((req, res) => {
    const chunks = [];
    req.on("data", (chunk) => chunks.push(chunk));
    req.on("end", () => {
      const body = Buffer.concat(chunks).toString("utf8"); // the raw bytes, not re-serialised JSON
      let payload;
      try {
        // Checks the signature over the exact body and the timestamp (5 minutes).
        payload = webhook.verify(body, req.headers);
      } catch (e) {
        console.log(JSON.stringify({ rejected: e.message }));
        res.writeHead(400).end();
        return;
      }
      const msgId = req.headers["webhook-id"];
      if (!seen.has(msgId)) { // a retry of a handled message: answer 2xx, do nothing
        seen.add(msgId);
        const type = req.headers["webhook-event-type"];
        console.log(JSON.stringify({ verified: msgId, type, body: payload }));
      }
      res.writeHead(204).end();
    });
  })
  .listen(Number(process.env.PORT || 8000), "127.0.0.1");
