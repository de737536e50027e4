// Second opinion: FHIR.js (npm "fhir") validates NDJSON resources read from stdin.
// Prints one JSON line per resource: {"id", "type", "errors": [messages of severity error]}.
const { Fhir } = require('fhir');
const readline = require('readline');
const fhir = new Fhir();
const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  if (!line.trim()) return;
  const res = JSON.parse(line);
  const out = fhir.validate(res);
  const errors = out.messages.filter((m) => m.severity === 'error').map((m) => `${m.location}: ${m.message}`);
  process.stdout.write(JSON.stringify({ id: res.id, type: res.resourceType, errors }) + '\n');
});
