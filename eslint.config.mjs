// The JupyterLab extension template's ESLint setup (jupyterlab/extension-template, eslint.config.mjs),
// with this repository's own folders added to its ignores. `jlpm eslint:check` runs it; `jlpm eslint` fixes.
import js from '@eslint/js';
import { defineConfig } from 'eslint/config';
import tseslint from 'typescript-eslint';
import prettierRecommended from 'eslint-plugin-prettier/recommended';
import globals from 'globals';
import jupyterPlugin from '@jupyter/eslint-plugin';

export default defineConfig([
  {
    ignores: [
      'node_modules',
      'dist',
      'coverage',
      '**/*.js',
      '**/*.d.ts',
      '.venv',
      'tests',
      '**/__tests__',
      'ui-tests',
      // built output and the Python package (its labext/static is the built panel)
      'lib',
      'jupyter_gpu'
    ]
  },
  js.configs.recommended,
  tseslint.configs.recommended,
  {
    plugins: {
      jupyter: jupyterPlugin
    }
  },
  jupyterPlugin.configs.recommended,
  {
    files: ['**/*.ts', '**/*.tsx'],
    languageOptions: {
      globals: {
        ...globals.browser,
        ...globals.es2015,
        ...globals.node
      },
      parserOptions: {
        project: 'tsconfig.json',
        sourceType: 'module'
      }
    },
    rules: {
      '@typescript-eslint/naming-convention': [
        'error',
        {
          selector: 'interface',
          format: ['PascalCase'],
          custom: {
            regex: '^I[A-Z]',
            match: true
          }
        }
      ],
      '@typescript-eslint/no-unused-vars': ['warn', { args: 'none' }],
      '@typescript-eslint/no-explicit-any': 'off',
      '@typescript-eslint/no-namespace': 'off',
      '@typescript-eslint/no-use-before-define': 'off',
      curly: ['error', 'all'],
      eqeqeq: 'error',
      'prefer-arrow-callback': 'error',
      // The panel is in English only: it takes no ITranslator, and the browser tests read its text.
      'jupyter/no-untranslated-string': 'off',
      // The panel and its status bar item are added to the shell at activation, so their modules are
      // needed at once: importing them lazily would only delay the panel.
      'jupyter/prefer-lazy-imports': 'off'
    }
  },
  prettierRecommended,
  {
    // The template's single-quote rule. typescript-eslint 8 no longer has @typescript-eslint/quotes, and
    // eslint-config-prettier (in prettierRecommended) turns `quotes` off, so it is turned back on after it,
    // in the form eslint-config-prettier documents as compatible with Prettier.
    files: ['**/*.ts', '**/*.tsx'],
    rules: {
      quotes: ['error', 'single', { avoidEscape: true, allowTemplateLiterals: false }]
    }
  }
]);
