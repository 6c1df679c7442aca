'use strict';
// End to end against a running server: health, issue a number, verify it, score a payment by it, and one
// refused request, printed as one JSON object. Exits 1 when any step fails.
//
//   POSGUARD_TARGET=127.0.0.1:50051 POSGUARD_API_KEY=pgk_... node example.js
//
// TLS is used when POSGUARD_TLS=1 or any of POSGUARD_CA_FILE, POSGUARD_CERT_FILE, POSGUARD_KEY_FILE,
// POSGUARD_SERVER_NAME is set (the same variables as the `posguard` command).

const crypto = require('node:crypto');

const { PosguardClient, PosguardError } = require('./index');

/** @returns {import('./index').TlsOptions | undefined} */
function tlsFromEnvironment() {
  const env = process.env;
  const tls = {
    caFile: env.POSGUARD_CA_FILE || undefined,
    certFile: env.POSGUARD_CERT_FILE || undefined,
    keyFile: env.POSGUARD_KEY_FILE || undefined,
    serverName: env.POSGUARD_SERVER_NAME || undefined,
  };
  const wanted = ['1', 'true', 'yes'].includes((env.POSGUARD_TLS || '').toLowerCase());
  return wanted || Object.values(tls).some(Boolean) ? tls : undefined;
}

/** @param {import('./index').PosguardClient} client */
async function run(client) {
  const health = await client.checkHealth();

  const issued = await client.issueCustomerId({});
  const customer = issued.customer;
  if (!customer || !customer.primary) throw new Error('IssueCustomerId answered without a customer');

  // Verify the grouped form a person would key in: the server ignores the spaces.
  const verified = await client.verifyCustomerId({ number: customer.primary.display });

  const transaction = {
    transactionId: `node-example-${crypto.randomUUID()}`,
    customerNumber: customer.primary.number,
    amount: { amountMinor: 1250, currency: 'CNY' },
    merchantId: 'm-1',
    terminalId: 't-1',
    mcc: '5411',
    eventTime: new Date(),
    channel: /** @type {const} */ ('CHANNEL_POS'),
    location: { latitude: 30.59, longitude: 114.31 },
  };
  const scored = await client.scoreTransaction({ transaction });

  // A request the server refuses: currency codes must be upper case. The refusal names the field.
  let refused = null;
  try {
    await client.scoreTransaction({
      transaction: {
        ...transaction,
        transactionId: `node-example-${crypto.randomUUID()}`,
        amount: { amountMinor: 1250, currency: 'cny' },
      },
    });
  } catch (error) {
    if (!(error instanceof PosguardError)) throw error;
    refused = error.toJSON();
  }
  if (refused === null) throw new Error('a lower-case currency was accepted');

  return {
    health,
    issued: {
      customerId: customer.customerId,
      number: customer.primary.number,
      display: customer.primary.display,
      status: customer.primary.status,
    },
    verified: {
      valid: verified.valid,
      reason: verified.reason,
      status: verified.status,
      customerId: verified.customerId,
      normalizedNumber: verified.normalizedNumber,
    },
    scored: {
      transactionId: scored.transactionId,
      customerId: scored.customerId,
      riskScore: scored.riskScore,
      decision: scored.decision,
      reasons: scored.reasons.map((r) => ({ code: r.code, message: r.message, weight: r.weight })),
      model: scored.model,
      replayed: scored.replayed,
    },
    error: refused,
  };
}

async function main() {
  const client = new PosguardClient(process.env.POSGUARD_TARGET || undefined, {
    apiKey: process.env.POSGUARD_API_KEY || undefined,
    tls: tlsFromEnvironment(),
  });
  try {
    process.stdout.write(`${JSON.stringify(await run(client), null, 2)}\n`);
  } catch (error) {
    // A PosguardError's message already reads "CODE (reason): message".
    process.stderr.write(`posguard example failed: ${error instanceof Error ? error.message : error}\n`);
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

main();
