// Validates Kubernetes objects (a JSON array on stdin) against the API schemas of the npm
// package kubernetes-models (and @kubernetes-models/prometheus-operator for ServiceMonitor).
import { readFileSync } from "node:fs";
const docs = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;
for (const doc of docs) {
  const [group, version] = doc.apiVersion.includes("/") ? doc.apiVersion.split("/") : [null, doc.apiVersion];
  const pkg = group === "monitoring.coreos.com" ? "@kubernetes-models/prometheus-operator" : "kubernetes-models";
  const path = `${pkg}/${group ? group + "/" : ""}${version}/${doc.kind}`;
  const where = `${doc.kind} ${doc.metadata?.name}`;
  let Model;
  try {
    Model = (await import(path))[doc.kind];
  } catch (e) {
    console.error(`FAIL schema: ${where}: no schema for ${doc.apiVersion} ${doc.kind}`);
    failed++;
    continue;
  }
  try {
    new Model(doc).validate();
  } catch (e) {
    console.error(`FAIL schema: ${where}: ${e.message}`);
    failed++;
  }
}
console.log(`schema: ${docs.length - failed} of ${docs.length} objects valid`);
process.exit(failed ? 1 : 0);
