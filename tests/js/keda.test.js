// The KEDA objects `chorus-operator render` makes of a RealtimeApp with
// `spec.autoscaling.engine: KEDA`, checked with KEDA's own models (@kubernetes-models/keda:
// validate() against the schemas generated from KEDA's v1alpha1 API types), and what a user
// would look at: the ScaledObject scales the RealtimeApp, its triggers read CPU and the app's
// GET /v1/nodes through the Service with the API token, and the TriggerAuthentication hands
// that trigger the app's API token Secret. The models accept fields they do not know, so each
// spec is also compared whole. The HPA engine is checked in tests/packaging/test_autoscalers.py.
//
// The operator binary comes from CHORUS_OPERATOR_BIN (scripts/test.sh sets it), else
// <repo>/target/debug/chorus-operator; under CI=true a missing binary fails the suite.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const YAML = require('yaml');
const h = require('./harness');

const SUITE = 'KEDA objects of chorus-operator render (tests/js/keda.test.js)';
const BIN = process.env.CHORUS_OPERATOR_BIN ||
  path.resolve(__dirname, '../../target/debug/chorus-operator');
const missing = (() => {
  try { fs.accessSync(BIN, fs.constants.X_OK); return null; } catch { return `${BIN} not found (cargo build -p chorus-operator, or set CHORUS_OPERATOR_BIN)`; }
})();
const skip = missing ? h.cannotRun(SUITE, missing) : false;

// ESM only: loaded once, by import().
const models = import('@kubernetes-models/keda/keda.sh/v1alpha1');

const NAMESPACE = 'apps';
const SCALE_DOWN = { stabilizationWindowSeconds: 120, maxReplicasPerMinute: 2 };
const BEHAVIOR = {
  scaleDown: {
    stabilizationWindowSeconds: 120,
    policies: [{ type: 'Pods', value: 2, periodSeconds: 60 }],
  },
};

function app(name, spec) {
  return { apiVersion: 'chorus.rs/v1alpha1', kind: 'RealtimeApp', metadata: { name, namespace: NAMESPACE }, spec };
}

const APPS = [
  app('both', {
    service: { port: 8080 },
    autoscaling: {
      enabled: true, engine: 'KEDA', minReplicas: 2, maxReplicas: 8,
      targetConnectionsPerReplica: 5000, targetCPUUtilizationPercentage: 70, scaleDown: SCALE_DOWN,
    },
  }),
  app('cpu', {
    autoscaling: {
      enabled: true, engine: 'KEDA', minReplicas: 3, maxReplicas: 20,
      targetCPUUtilizationPercentage: 60, scaleDown: SCALE_DOWN,
    },
  }),
  app('sockets', {
    auth: { apiTokenSecretRef: { name: 'sockets-backend', key: 'api' } },
    autoscaling: {
      enabled: true, engine: 'KEDA', minReplicas: 1, maxReplicas: 4,
      targetConnectionsPerReplica: 2000, targetCPUUtilizationPercentage: null, scaleDown: SCALE_DOWN,
    },
  }),
];

// Every object the operator would apply for these RealtimeApps.
function render(apps) {
  // JSON is YAML, and leaves no scalar to the reader's guess (YAML 1.1 reads `off` as false).
  const input = apps.map((a) => JSON.stringify(a)).join('\n---\n');
  const run = spawnSync(BIN, ['render', '-f', '-'], { input, encoding: 'utf8' });
  assert.equal(run.status, 0, `chorus-operator render failed: ${run.error || run.stderr.trim()}`);
  const docs = YAML.parseAllDocuments(run.stdout);
  for (const d of docs) assert.deepEqual(d.errors, [], 'render printed YAML that does not parse');
  return docs.map((d) => d.toJS()).filter(Boolean);
}

let rendered;
function objects(kind, name) {
  rendered ??= render(APPS);
  return rendered.filter((o) => o.kind === kind && o.metadata.name === name);
}

// The object through KEDA's model: throws with the schema's complaint when it is invalid.
async function validate(object) {
  const { ScaledObject, TriggerAuthentication } = await models;
  const Model = { ScaledObject, TriggerAuthentication }[object.kind];
  assert.ok(Model, `no KEDA model for ${object.kind}`);
  assert.equal(object.apiVersion, Model.apiVersion);
  new Model(object).validate();
}

function target(name) {
  return { apiVersion: 'chorus.rs/v1alpha1', kind: 'RealtimeApp', name };
}

test('connections and CPU: a valid ScaledObject with both triggers and its TriggerAuthentication', { skip }, async () => {
  const [scaled, ...more] = objects('ScaledObject', 'both');
  assert.ok(scaled && more.length === 0, 'one ScaledObject named like the app');
  await validate(scaled);
  assert.equal(scaled.metadata.namespace, NAMESPACE);
  assert.deepEqual(scaled.spec, {
    scaleTargetRef: target('both'),
    minReplicaCount: 2,
    maxReplicaCount: 8,
    advanced: { horizontalPodAutoscalerConfig: { behavior: BEHAVIOR } },
    triggers: [
      { type: 'cpu', metricType: 'Utilization', metadata: { value: '70' } },
      {
        type: 'metrics-api',
        metricType: 'AverageValue',
        metadata: {
          url: 'http://both.apps.svc:8080/v1/nodes',
          valueLocation: 'sockets',
          targetValue: '5000',
          authMode: 'bearer',
        },
        authenticationRef: { name: 'both' },
      },
    ],
  });

  const [auth, ...moreAuth] = objects('TriggerAuthentication', 'both');
  assert.ok(auth && moreAuth.length === 0, 'one TriggerAuthentication, the one authenticationRef names');
  await validate(auth);
  assert.equal(auth.metadata.namespace, NAMESPACE);
  // KEDA's metrics-api scaler reads the bearer token from the parameter `token`.
  assert.deepEqual(auth.spec, { secretTargetRef: [{ parameter: 'token', name: 'both-api-token', key: 'token' }] });

  // What the trigger reaches exists in the same render: the Service on that port, and the
  // generated API token Secret with that key.
  const [service] = objects('Service', 'both');
  assert.ok(service, 'the Service the url names');
  assert.ok(service.spec.ports.some((p) => p.port === 8080), `Service ports: ${JSON.stringify(service.spec.ports)}`);
  const [secret] = objects('Secret', 'both-api-token');
  assert.ok(secret, 'the API token Secret is rendered');
  assert.ok('token' in { ...secret.data, ...secret.stringData }, `Secret keys: ${Object.keys({ ...secret.data, ...secret.stringData })}`);
  assert.equal(objects('HorizontalPodAutoscaler', 'both').length, 0, 'KEDA makes the HPA, not the operator');
});

test('CPU only: a valid ScaledObject with the cpu trigger and no TriggerAuthentication', { skip }, async () => {
  const [scaled] = objects('ScaledObject', 'cpu');
  assert.ok(scaled, 'a ScaledObject');
  await validate(scaled);
  assert.deepEqual(scaled.spec, {
    scaleTargetRef: target('cpu'),
    minReplicaCount: 3,
    maxReplicaCount: 20,
    advanced: { horizontalPodAutoscalerConfig: { behavior: BEHAVIOR } },
    triggers: [{ type: 'cpu', metricType: 'Utilization', metadata: { value: '60' } }],
  });
  assert.equal(objects('TriggerAuthentication', 'cpu').length, 0);
  assert.equal(objects('HorizontalPodAutoscaler', 'cpu').length, 0);
});

test('connections only, own API token Secret: the TriggerAuthentication names that Secret and key', { skip }, async () => {
  const [scaled] = objects('ScaledObject', 'sockets');
  const [auth] = objects('TriggerAuthentication', 'sockets');
  assert.ok(scaled && auth, 'a ScaledObject and a TriggerAuthentication');
  await validate(scaled);
  await validate(auth);
  assert.deepEqual(scaled.spec.scaleTargetRef, target('sockets'));
  assert.deepEqual(scaled.spec.triggers, [{
    type: 'metrics-api',
    metricType: 'AverageValue',
    metadata: {
      url: 'http://sockets.apps.svc:80/v1/nodes',
      valueLocation: 'sockets',
      targetValue: '2000',
      authMode: 'bearer',
    },
    authenticationRef: { name: 'sockets' },
  }]);
  assert.deepEqual(auth.spec, { secretTargetRef: [{ parameter: 'token', name: 'sockets-backend', key: 'api' }] });
});

test("KEDA's models refuse broken objects, so the checks above can fail", { skip }, async () => {
  const [scaled] = objects('ScaledObject', 'both');
  const [auth] = objects('TriggerAuthentication', 'both');
  const broken = (object, change) => { const copy = structuredClone(object); change(copy); return copy; };
  const cases = [
    [broken(scaled, (o) => { delete o.spec.triggers[1].type; }), /triggers\/1 must have required property type/],
    [broken(scaled, (o) => { o.spec.triggers[1].metadata.targetValue = 5000; }), /targetValue must be string/],
    [broken(scaled, (o) => { delete o.spec.scaleTargetRef.name; }), /scaleTargetRef must have required property name/],
    [broken(scaled, (o) => { delete o.spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown.policies[0].periodSeconds; }),
      /policies\/0 must have required property periodSeconds/],
    [broken(auth, (o) => { delete o.spec.secretTargetRef[0].key; }), /secretTargetRef\/0 must have required property key/],
  ];
  for (const [object, complaint] of cases) {
    await assert.rejects(validate(object), complaint);
  }
});

test('engine Operator, engine HPA and autoscaling off render no KEDA object', { skip }, () => {
  const auto = { targetConnectionsPerReplica: 5000 };
  const docs = render([
    app('operator', { autoscaling: { ...auto, enabled: true, engine: 'Operator' } }),
    app('hpa', { autoscaling: { ...auto, enabled: true, engine: 'HPA' } }),
    app('off', { autoscaling: { ...auto, enabled: false, engine: 'KEDA' } }),
  ]);
  const keda = docs.filter((o) => o.apiVersion.startsWith('keda.sh/'));
  assert.deepEqual(keda.map((o) => `${o.kind}/${o.metadata.name}`), []);
  assert.ok(docs.some((o) => o.kind === 'Deployment'), 'the apps render');
});
